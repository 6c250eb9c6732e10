"""Train a captioner on COCO-style data: ``python train.py --help`` (same as ``captioner train``)."""

import sys

from captioner.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
