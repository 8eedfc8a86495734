"""At a hospital, run only the DermFed app bundle signed by the coordinator (see common.app_signature).

A SuperNode started with `--isolation process` runs no app code itself: a SuperExec asks it for
tasks and starts one `flwr-clientapp` process per task, which pulls the message, the run and the
bundle, installs the bundle and imports its ClientApp. DermFed's two entry points wrap exactly
that, with Flower's own code:

- `dermfed-superexec`: Flower's SuperExec, launching `dermfed-clientapp` instead of
  `flwr-clientapp`;
- `dermfed-clientapp`: Flower's ClientApp process, which verifies the bundle's signature against
  the keys in the file named by `DERMFED_TRUSTED_APP_KEYS` right after pulling it, before it is
  installed or imported. An unsigned or modified bundle fails the task with `UntrustedApp`;
  the reply the server receives is an error, and none of the bundle's code ran here.

`dermfed node` starts the SuperNode and this SuperExec together.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from common.app_signature import SIGNATURE_KEY, UntrustedApp, load_trusted_keys, verify_bundle

TRUSTED_KEYS_ENV = "DERMFED_TRUSTED_APP_KEYS"


def _trusted_keys_file() -> Path:
    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    if not value or not Path(value).is_file():
        raise UntrustedApp(f"{TRUSTED_KEYS_ENV} must name the file with the coordinator's app-signing public key "
                           f"(got {value!r}); refusing to run any app bundle")
    return Path(value)


def clientapp_main() -> None:
    """`dermfed-clientapp`: flwr-clientapp, verifying the bundle before installing it.

    The check runs where Flower installs the bundle, right after it pulled the task: the bundle
    is not yet on disk and none of its code was imported, and the task's message is known, so
    the failure goes back to the server as an error reply instead of silence.
    """
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    pull, install = runtime.pull_task_input, runtime.install_from_fab
    signature: dict[str, str] = {}

    def pull_remembering_signature(client):  # type: ignore[no-untyped-def]
        message, context, run, fab = pull(client)
        signature["value"] = str(context.run_config.get(SIGNATURE_KEY, ""))
        return message, context, run, fab

    def install_if_signed(fab_content: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        verify_bundle(fab_content, signature.get("value", ""), load_trusted_keys(_trusted_keys_file()))
        return install(fab_content, *args, **kwargs)

    runtime.pull_task_input = pull_remembering_signature
    runtime.install_from_fab = install_if_signed
    flwr_clientapp()


def superexec_main() -> None:
    """`dermfed-superexec`: Flower's SuperExec, with `dermfed-clientapp` as the ClientApp process."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    _trusted_keys_file()  # fail at start-up, not at the first task
    launcher = shutil.which("dermfed-clientapp", path=str(Path(sys.executable).parent)) or "dermfed-clientapp"
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = launcher  # the executor looks the command up here per task
    flower_superexec()
