"""`python -m server.cli`: the same as the installed `dermfed`."""

import sys

from server.cli.main import main

sys.exit(main())
