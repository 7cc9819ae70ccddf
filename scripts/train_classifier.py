"""Evaluator classifier (good/bad + category) on the feedback schema, for `accelerate launch`.

    accelerate launch scripts/train_classifier.py --config configs/classifier/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_classifier.py --config configs/classifier/tiny.yaml   # 2 CPU procs
"""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["classifier", *sys.argv[1:]]))
