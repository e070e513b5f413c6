#!/usr/bin/env python
"""Convert a reference-implementation checkpoint: ``reste-timm convert`` from a checkout."""

import sys

from reste_timm.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
