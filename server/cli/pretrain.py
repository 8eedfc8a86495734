"""`dermfed pretrain`: centralised (pooled) or single-site VAE pretraining."""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from server.cli.options import add_common, add_force, claim_out, out_folder

if TYPE_CHECKING:
    from common.config import DermFedConfig


def cmd_pretrain(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.pretraining import run_pretraining
    from common.run_folder import PRETRAIN

    arm = f"local-{config.data.site}" if config.data.site else "pooled"
    folder = out_folder(config, f"pretrain-{arm}", args.out)
    claim_out(folder, PRETRAIN, args.force)
    summary = run_pretraining(config, folder)
    print(f"checkpoint: {folder / 'checkpoint.pt'}")
    print(f"reconstructions: {summary['grid']}")
    if "privacy" in summary:
        print(f"privacy spent: epsilon={summary['privacy']['epsilon']:.3f}, delta={summary['privacy']['delta']}")
    return 0


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    pretrain = sub.add_parser("pretrain", help="centralised (pooled) or single-site (data.site=NAME) VAE pretraining",
                              formatter_class=fmt)
    pretrain.add_argument("--out", default=None, help="run folder (default: output_dir/run_name)")
    add_force(pretrain)
    add_common(pretrain)
    pretrain.set_defaults(handler=cmd_pretrain)
