"""`dermfed`: the one command line of the project, one module per subcommand.

`main.py` builds the parser from each subcommand module's `register` and turns errors into one line and an exit code;
`options.py` holds what the subcommands share. The console script is `server.cli:main`.
"""

# `main` here is the function, bound over the submodule of the same name: the console script `server.cli:main`
# calls it (tests/test_cli.py checks that the installed script's target is this function).
from server.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
