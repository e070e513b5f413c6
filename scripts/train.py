#!/usr/bin/env python
"""Train a binary timm model: ``reste-timm train`` from a checkout.

    accelerate launch scripts/train.py --config configs/cifar10/resnet20_1w1a_reste.yaml
"""

import sys

from reste_timm.train.run import main

if __name__ == "__main__":
    sys.exit(main())
