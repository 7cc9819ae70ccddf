"""One GPU check, one table: the quickstart pipeline in bf16, SFT / RM / PPO speed on a ~0.5B
Qwen2-architecture model with random weights (built offline), FSDP2 with one process, and
peak GPU memory of full, LoRA, QLoRA and shared-base PPO (16-bit and 4-bit base).

    bash benchmarks/gpu_check.sh            # on a CUDA machine (about 5-8 minutes on one GPU)
    bash benchmarks/gpu_check.sh --cpu      # dry run of every row on CPU with a tiny model (seconds)

Every row runs the real `alignkit` stage command in its own process (``--worker``), so each
peak is that run's own: ``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on CPU.
Needs only torch, transformers, peft, accelerate and alignkit's small dependencies
(omegaconf, datasets, ...): no Hub access, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# Qwen2 architecture (GQA, SwiGLU, RMSNorm, rope) over the built-in word vocabulary: 24 layers of
# width 1024 give ~0.47B parameters. --cpu: the same code on a 2-layer, 64-wide model.
SHAPES = {
    "gpu": dict(hidden_size=1024, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=2),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2),
}


def build_model(out_dir: str, shape: dict) -> int:
    """Save a random-weight Qwen2 causal LM with alignkit's built-in tokenizer; return its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignkit.builtin import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **shape)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def rows(model: str, work: str, cpu: bool) -> list[tuple[str, str, list[str], str]]:
    """(row name, stage, arguments, what to report) for every row of the table."""
    steps = 3 if cpu else 30
    updates = 2 if cpu else 4
    quick = ([f"--{s}.train.max_steps=2" for s in ("sft", "rm", "ppo")] +
             ["--rm.rm.normalize_on=[builtin:sft:train:32]", "--ppo.ppo.eval_samples=8", "--ppo.ppo.rollout_batch_size=8",
              "--ppo.train.per_device_batch_size=8"] if cpu else [])
    common = ["--train.mixed_precision=bf16", "--log.progress=false", "--train.save_every=0", "--train.eval_every=0"]
    sft = [f"--model.name_or_path={model}", f"--train.max_steps={steps}", "--train.per_device_batch_size=16",
           "--data.eval_files=[]", *common]
    ppo = [f"--model.name_or_path={model}", f"--train.max_steps={updates}", "--train.learning_rate=1e-5",
           "--data.eval_files=[]", "--ppo.eval_samples=0", *common]
    if cpu:
        ppo += ["--ppo.rollout_batch_size=8", "--train.per_device_batch_size=8", "--ppo.response_length=8"]
    return [
        ("quickstart pipeline, bf16", "pipeline",
         ["--config", f"{CONFIGS}/pipeline/quickstart.yaml", f"--output_dir={work}/quickstart",
          *[f"--{s}.train.mixed_precision=bf16" for s in ("sft", "rm", "ppo")],
          *[f"--{s}.log.progress=false" for s in ("sft", "rm", "ppo")], *quick], "pipeline"),
        ("SFT full, bf16", "sft", ["--config", f"{CONFIGS}/sft/tiny.yaml", f"--output_dir={work}/sft", *sft],
         "tokens_per_second"),
        ("SFT full, bf16, FSDP2 (1 process)", "sft",
         ["--config", f"{CONFIGS}/sft/tiny.yaml", f"--output_dir={work}/sft_fsdp2", "--train.sharding=fsdp2", *sft],
         "tokens_per_second"),
        ("RM full, bf16", "rm",
         ["--config", f"{CONFIGS}/rm/tiny.yaml", f"--output_dir={work}/rm", f"--model.name_or_path={model}",
          f"--train.max_steps={steps}", "--data.eval_files=[]", "--rm.normalize_on=[builtin:sft:train:64]", *common],
         "pairs_per_second"),
        ("PPO full, bf16", "ppo", ["--config", f"{CONFIGS}/ppo/tiny.yaml", f"--output_dir={work}/ppo", *ppo],
         "seconds_per_update"),
        ("PPO LoRA, bf16", "ppo",
         ["--config", f"{CONFIGS}/ppo/tiny_lora.yaml", f"--output_dir={work}/ppo_lora", "--model.lora.merge_on_save=false",
          *ppo], "seconds_per_update"),
        ("PPO shared base, bf16", "ppo",
         ["--config", f"{CONFIGS}/ppo/tiny_shared_base.yaml", f"--output_dir={work}/ppo_shared", *ppo],
         "seconds_per_update"),
        ("PPO shared base, 4-bit base, bf16", "ppo",
         ["--config", f"{CONFIGS}/ppo/tiny_shared_base.yaml", f"--output_dir={work}/ppo_shared_4bit",
          "--model.load_in_4bit=true", *ppo], "seconds_per_update"),
        ("SFT QLoRA (4-bit base), bf16", "sft",
         ["--config", f"{CONFIGS}/sft/tiny_qlora.yaml", f"--output_dir={work}/sft_qlora", "--train.learning_rate=1e-4",
          *sft], "tokens_per_second"),
    ]


def worker(stage: str, args: list[str], out: str) -> None:
    """Run one stage in this process and write its summary and peak memory to ``out``."""
    import torch

    from alignkit.cli import run_stage

    config = args[args.index("--config") + 1]
    overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    start = time.time()
    summary = run_stage(stage, config, overrides)
    if torch.cuda.is_available():
        peak, where = torch.cuda.max_memory_allocated() / 2**20, "GPU"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"
    with open(out, "w") as f:
        json.dump({"summary": summary, "peak_mb": peak, "peak_of": where, "wall_s": time.time() - start}, f,
                  default=str)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="dry run on CPU with a tiny model")
    p.add_argument("--workdir", default=None, help="where models and runs go (default: a temp dir)")
    p.add_argument("--only", default="", help="comma-separated row numbers to run (default: all)")
    p.add_argument("--worker", nargs=2, metavar=("STAGE", "OUT"), help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        worker(args.worker[0], rest, args.worker[1])
        return 0

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for a dry run", file=sys.stderr)
        return 2
    work = args.workdir or tempfile.mkdtemp(prefix="alignkit-gpu-check-")
    model = os.path.join(work, "qwen2-random")
    n_params = build_model(model, SHAPES["cpu" if args.cpu else "gpu"])
    device = "CPU (dry run)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"model: Qwen2 architecture, random weights, {n_params / 1e6:.1f}M parameters; device: {device}", flush=True)
    wanted = {int(i) for i in args.only.split(",") if i}
    table, failed = [], 0
    for i, (name, stage, stage_args, key) in enumerate(rows(model, work, args.cpu), start=1):
        if wanted and i not in wanted:
            continue
        out = os.path.join(work, f"row{i}.json")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", stage, out, *stage_args],
                             capture_output=True, text=True, env=env)
        if run.returncode != 0 or not os.path.exists(out):
            failed += 1
            table.append((name, "FAILED", "", "", run.stderr.strip().splitlines()[-1][:80] if run.stderr else ""))
            print(f"row {i}: {name} FAILED\n{run.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        r = json.load(open(out))
        s = r["summary"] or {}
        if key == "pipeline":
            value = f"{r['wall_s']:.0f} s total"
            note = "; ".join(f"{k}: {v}" for k, v in _pipeline_note(work).items())
        else:
            v = s.get(key)
            unit = {"tokens_per_second": "tokens/s", "pairs_per_second": "pairs/s",
                    "seconds_per_update": "s/update"}[key]
            value = f"{v:,.1f} {unit}" if isinstance(v, (int, float)) else "n/a"
            note = f"{s.get('num_processes', 1)} process(es)" + (f", {s['memory_mode']}" if s.get("memory_mode") else "")
        table.append((name, "ok", value, f"{r['peak_mb']:,.0f} MB {r['peak_of']}", note))
        print(f"row {i} ({r['wall_s']:.0f} s): " + " | ".join(table[-1]), flush=True)
    widths = [max(len(str(row[c])) for row in table + [("row", "status", "result", "peak memory", "notes")])
              for c in range(5)]
    line = " | ".join
    print(line(h.ljust(w) for h, w in zip(("row", "status", "result", "peak memory", "notes"), widths)))
    print(line("-" * w for w in widths))
    for row in table:
        print(line(str(c).ljust(w) for c, w in zip(row, widths)))
    return 1 if failed else 0


def _pipeline_note(work: str) -> dict:
    path = os.path.join(work, "quickstart", "ppo", "summary.json")
    if not os.path.exists(path):
        return {}
    s = json.load(open(path))
    gold = (s.get("eval_after") or {}).get("gold_reward") if isinstance(s.get("eval_after"), dict) else None
    return {"PPO updates": s.get("updates"), **({"gold after": round(gold, 2)} if gold is not None else {})}


if __name__ == "__main__":
    sys.exit(main())
