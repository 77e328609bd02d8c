"""``python -m embedq COMMAND``: the same as the ``embedq`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
