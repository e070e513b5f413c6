"""``python -m reste_timm <command>``: the ``reste-timm`` command (see :mod:`reste_timm.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
