"""Supervised fine-tuning, for `accelerate launch`.

    accelerate launch scripts/train_sft.py --config configs/sft/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_sft.py --config configs/sft/tiny.yaml   # 2 CPU procs
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train_sft.py --config ...
"""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
