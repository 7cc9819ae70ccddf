"""Train a reward model from a YAML config, on one process or several.

    accelerate launch scripts/train_rm.py --config configs/rm/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_rm.py --config configs/rm/tiny.yaml
    python scripts/train_rm.py --config configs/rm/tiny.yaml --train.max_steps=20

Same as ``alignkit rm``: any field can be overridden with --section.key=value.
"""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", *sys.argv[1:]]))
