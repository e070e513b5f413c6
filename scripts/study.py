#!/usr/bin/env python
"""The estimator study: ``reste-timm study`` from a checkout."""

import sys

from reste_timm.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
