"""`dermfed`: the one command line of the project.

    dermfed <subcommand> --config PRESET [key=value ...]

PRESET is a file in configs/ (by name, e.g. `demo`) or a path; every config key can be
overridden as key=value, dotted for nested keys (data.root=/data/ham10000). `dermfed config`
prints every key with its resolved value.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import sys
import traceback
from typing import Optional, Sequence

from common.interrupts import Interrupted, stop_signals_raise  # standard library only: installed first
from server.cli import config, data, deploy, evaluate, node, pretrain, report, simulate, study

log = logging.getLogger("dermfed")

SUBCOMMANDS = (data, pretrain, simulate, deploy, node, config, evaluate, report, study)  # in `dermfed --help`'s order


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="dermfed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.register(sub, fmt)
    return parser


# Errors that are the input's, not the program's: one line, exit code 2. Named, not imported: an error of
# one of these classes can only exist once its module was imported, so `dermfed config` imports none of them.
USER_ERRORS = (("common.config", "ConfigError"), ("common.data.catalog", "DataError"),
               ("common.privacy", "PrivacyBudgetExhausted"), ("server.deploy", "DeployError"),
               ("client.node", "NodeError"), ("common.checkpoint", "CheckpointError"),
               ("common.run_folder", "RunFolderError"),
               ("server.evaluation.arms", "WeightsFileError"))


def is_user_error(exc: BaseException) -> bool:
    return any(module in sys.modules and isinstance(exc, getattr(sys.modules[module], name, ()))
               for module, name in USER_ERRORS)


# What a file-system error means for the person who typed the command, and what to do about it.
FILE_SYSTEM_ERRORS = {
    errno.ENOENT: ("does not exist", "check the path"),
    errno.EACCES: ("permission denied", "give this user access to it, or choose another path"),
    errno.EPERM: ("operation not permitted", "give this user access to it, or choose another path"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "choose another path"),
    errno.EEXIST: ("exists already, and is not a folder", "choose another path, or move the file away"),
    errno.EISDIR: ("is a folder where a file is needed", "choose another path"),
    errno.EROFS: ("is on a read-only file system", "choose a writable location"),
    errno.ENOSPC: ("no space left on the device", "free space there or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another location"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the links"),
}


def file_system_message(exc: OSError) -> Optional[str]:
    """One line for an operating-system error about a path (None: not one of those, a bug)."""
    if exc.errno not in FILE_SYSTEM_ERRORS:
        return str(exc) if isinstance(exc, FileNotFoundError) and exc.errno is None else None  # our own message
    what, todo = FILE_SYSTEM_ERRORS[exc.errno]
    where = os.fsdecode(exc.filename) if exc.filename is not None else "(a file of this command)"
    return f"{where}: {what}; {todo}"


def _stdout_is_gone() -> bool:
    """Whether the reader of our standard output went away (`dermfed config | head`), not some other pipe or socket."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def parse_arguments(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Options may come after the key=value overrides (`dermfed pretrain a=b --out X c=d`)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*getattr(args, "overrides", []), *overrides]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    with stop_signals_raise():  # first: a SIGTERM during the imports below is a message and exit code 130 too
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    verbose, command = False, "dermfed"
    try:
        parser = build_parser()
        args = parse_arguments(parser, argv)
        verbose, command = args.verbose, f"dermfed {args.command}"
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        from common.config import load_config

        # `simulate --resume` continues with the run's own config plus the overrides, parsed and validated together
        # by its handler (`common.run_folder.resume_config`): never validated against a preset first.
        config = None if getattr(args, "resume_from_run", False) and args.resume else load_config(args.config,
                                                                                                   args.overrides)
        if config is not None:
            from server.evaluation.arms import check_arm_names

            check_arm_names(config.evaluation.arms)  # against the arms' registry, for every command as for the config
        return args.handler(args, config)
    except Interrupted as exc:
        return _fail(f"{command}: interrupted by {exc.signal_name}", verbose, 130)
    except BrokenPipeError:
        if not _stdout_is_gone():
            return _unexpected(sys.exc_info()[1], verbose)  # type: ignore[arg-type]
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write; no second error at exit
        return 141  # as a program ended by SIGPIPE: what a shell expects of `... | head`
    except OSError as exc:
        message = file_system_message(exc)
        return _fail(f"dermfed: error: {message}", verbose, 2) if message else _unexpected(exc, verbose)
    except Exception as exc:  # noqa: BLE001 - one line for the user; the stack trace with -v
        return _fail(f"dermfed: error: {exc}", verbose, 2) if is_user_error(exc) else _unexpected(exc, verbose)


def _fail(message: str, verbose: bool, code: int) -> int:
    print(message, file=sys.stderr)
    if verbose:
        traceback.print_exc()
    return code


def _unexpected(exc: BaseException, verbose: bool) -> int:
    return _fail(f"dermfed: unexpected error: {type(exc).__name__}: {exc} (run again with -v for the stack trace)",
                 verbose, 1)
