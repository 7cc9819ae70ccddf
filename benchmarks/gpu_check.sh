#!/usr/bin/env bash
# The GPU check: one table (quickstart pipeline in bf16; SFT tokens/s, RM pairs/s, PPO s/update on a
# ~0.5B random-weight Qwen2 model; FSDP2 with one process; peak GPU memory of full, LoRA, QLoRA and shared-base PPO).
#   bash benchmarks/gpu_check.sh          # one CUDA GPU, about 5-8 minutes
#   bash benchmarks/gpu_check.sh --cpu    # dry run on CPU with a tiny model (what the test suite runs)
# Needs python with torch, transformers, peft, accelerate and alignkit installed (or src/ on PYTHONPATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
