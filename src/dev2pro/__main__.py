"""`python -m dev2pro`: the same command as `dev2pro`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
