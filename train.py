#!/usr/bin/env python
"""NEST pretraining: python train.py --config configs/X.yaml key=value ...  (see nest/train_cli.py)"""
import sys

from nest.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
