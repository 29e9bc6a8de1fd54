"""``python -m flowconvert``: the same command line as the ``flowconvert`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
