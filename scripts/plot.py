#!/usr/bin/env python
"""Draw a run's training curves: ``reste-timm plot`` from a checkout."""

import sys

from reste_timm.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
