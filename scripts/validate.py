#!/usr/bin/env python
"""Top-1/top-5 of a model: ``reste-timm validate`` from a checkout."""

import sys

from reste_timm.cli.validate import main

if __name__ == "__main__":
    sys.exit(main())
