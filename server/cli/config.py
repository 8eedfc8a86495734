"""`dermfed config`: the resolved configuration, every key."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from server.cli.options import add_common

if TYPE_CHECKING:
    from common.config import DermFedConfig


def cmd_config(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.config import config_to_yaml, flatten_config

    if args.flat:
        for key, value in flatten_config(config).items():
            print(f"{key}={json.dumps(value)}")
    else:
        print(config_to_yaml(config), end="")
    return 0


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    config = sub.add_parser("config", help="print the resolved configuration (every key)", formatter_class=fmt)
    config.add_argument("--flat", action="store_true", help="one key=value line per key")
    add_common(config)
    config.set_defaults(handler=cmd_config)
