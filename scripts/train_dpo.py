"""DPO on the feedback schema, for `accelerate launch`.

    accelerate launch scripts/train_dpo.py --config configs/dpo/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_dpo.py --config configs/dpo/tiny.yaml   # 2 CPU procs
"""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
