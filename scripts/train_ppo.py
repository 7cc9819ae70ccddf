"""PPO with a KL penalty, for `accelerate launch`.

    accelerate launch scripts/train_ppo.py --config configs/ppo/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_ppo.py --config configs/ppo/tiny.yaml   # 2 CPU procs
    python scripts/train_ppo.py --config configs/ppo/tiny.yaml --train.max_steps=5 --resume

Same as ``alignkit ppo``: any field can be overridden with --section.key=value.
"""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
