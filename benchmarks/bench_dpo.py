"""DPO training speed: alignkit vs TRL 1.16 DPOTrainer on the same model, pairs, max length and batch.

    /work/main/.venv/bin/python benchmarks/bench_dpo.py                          # builtin:small, 40 steps of 8 pairs
    /work/main/.venv/bin/python benchmarks/bench_dpo.py --model builtin:tiny --repeats 3

Each run is one subprocess (its own peak RSS), one torch thread, bf16 autocast (--precision), no
gradient checkpointing, AdamW, the same learning rate and linear schedule, 8 pairs per optimizer
step, sigmoid loss with beta 0.1. Both at their best settings on CPU: reference log-probs computed
once before training (TRL ``precompute_ref_log_probs=True``; alignkit always does), TRL's fused LM
head (its default), alignkit's packing (each prompt once per pair, no padding). TRL's padding_free
is disabled in 1.16. TRL gets the same pairs as conversational {prompt, chosen, rejected} rows.

Timed the same way for both, not from their logs: a global optimizer-step hook stamps wall and
process CPU time after each step; pairs/s = pairs of steps 2..N / time from the end of step 1 to the
end of step N (start-up, reference pre-computation and saving excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


class StepClock:
    """Wall and process CPU time after every optimizer step (global hook: sees any trainer's optimizer)."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.marks: list[tuple[float, float]] = []
        self.handle = register_optimizer_step_post_hook(
            lambda *a: self.marks.append((time.perf_counter(), time.process_time())))

    def rates(self, pairs_per_step: int) -> dict:
        (w0, c0), (w1, c1) = self.marks[0], self.marks[-1]
        pairs = (len(self.marks) - 1) * pairs_per_step
        return {"pairs_per_second": pairs / (w1 - w0), "pairs_per_cpu_second": pairs / (c1 - c0),
                "timed_steps": len(self.marks) - 1}


def pair_rows(n: int):
    """The first n untied, aggregated pairs of the built-in task, as alignkit's DPO stage reads them."""
    from alignkit.dpo import DPOSettings, _settings, _only
    from alignkit.rm_data import aggregate, comparisons_of
    from alignkit.schema import load_examples

    examples = _only(load_examples(f"builtin:pairs:train:{n + 200}"), ("pairwise",))
    settings = _settings(DPOSettings(), examples)
    rows = []
    for ex in aggregate(examples, "majority"):
        for c in comparisons_of(ex, settings)[0]:
            if not c.tie:
                rows.append({"prompt": ex.prompt, "chosen": ex.answers[c.winner], "rejected": ex.answers[c.loser]})
    return rows[:n]


def run_alignkit(args) -> dict:
    from alignkit.config import load_config
    from alignkit.dpo import DPOConfig, train_dpo
    from alignkit.schema import write_jsonl, parse_row

    out = tempfile.mkdtemp(prefix="bench-dpo-alignkit-")
    data = os.path.join(out, "pairs.jsonl")
    write_jsonl([parse_row(r, "bench") for r in pair_rows(args.steps * args.pairs)], data)
    cfg = load_config(DPOConfig, data={
        "model": {"name_or_path": args.model},
        "data": {"train_files": [data], "max_length": args.max_length, "packing": not args.no_packing},
        "train": {"max_steps": args.steps, "per_device_batch_size": args.pairs, "learning_rate": args.lr,
                  "lr_scheduler": "linear", "warmup_ratio": 0.0, "mixed_precision": args.precision,
                  "log_every": args.steps, "seed": 0, "num_threads": 1},
        "dpo": {"beta": 0.1}, "log": {"progress": False}, "output_dir": out})
    clock = StepClock()
    summary = train_dpo(cfg)
    clock.handle.remove()
    return {**clock.rates(args.pairs), "reference_seconds": summary["reference_seconds"],
            "final_loss": summary["train_loss"]}


def run_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer, resolve_path

    torch.set_num_threads(1)
    tok = load_tokenizer(ModelConfig(name_or_path=args.model))
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pair_rows(args.steps * args.pairs)]
    model = AutoModelForCausalLM.from_pretrained(resolve_path(args.model))
    out = tempfile.mkdtemp(prefix="bench-dpo-trl-")
    cfg = DPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.pairs,
                    learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, beta=0.1,
                    bf16=args.precision == "bf16", gradient_checkpointing=False, max_length=args.max_length,
                    precompute_ref_log_probs=True, logging_steps=args.steps, save_strategy="no", report_to=[],
                    seed=0, use_cpu=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    clock = StepClock()
    trainer.train()
    clock.handle.remove()
    return {**clock.rates(args.pairs), "final_loss": trainer.state.log_history[-1].get("train_loss")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step (both trainers)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    p.add_argument("--repeats", type=int, default=1, help="alternate the runs this many times; medians reported")
    p.add_argument("--no-packing", action="store_true", help="alignkit with padded batches, like TRL")
    p.add_argument("--run", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        result = run_alignkit(args) if args.run == "alignkit" else run_trl(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print("BENCH_RESULT " + json.dumps(result))
        return
    results = {"alignkit": [], "trl": []}
    for _ in range(args.repeats):
        for lib in results:
            cmd = [sys.executable, __file__, "--run", lib, "--model", args.model, "--steps", str(args.steps),
                   "--pairs", str(args.pairs), "--max-length", str(args.max_length), "--lr", str(args.lr),
                   "--precision", args.precision] + (["--no-packing"] if args.no_packing else [])
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{lib} failed:\n{proc.stderr[-3000:]}")
            results[lib].append(json.loads(line[0].split(" ", 1)[1]))
            print(f"  {lib:<9} {results[lib][-1]}", file=sys.stderr)
    med = {lib: {k: statistics.median(r[k] for r in runs) for k in ("pairs_per_second", "pairs_per_cpu_second",
                                                                    "peak_rss_mb")} for lib, runs in results.items()}
    print(f"\nmodel {args.model}, {args.steps} steps x {args.pairs} pairs, max_length {args.max_length}, precision "
          f"{args.precision}, 1 thread, alignkit packing {'off' if args.no_packing else 'on'}, "
          f"median of {args.repeats} run(s)\n")
    print("| trainer | pairs/s | ratio | pairs/CPU-s | ratio | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for lib in ("alignkit", "trl"):
        r, t = med[lib], med["trl"]
        print(f"| {lib} | {r['pairs_per_second']:.1f} | {r['pairs_per_second'] / t['pairs_per_second']:.2f} | "
              f"{r['pairs_per_cpu_second']:.1f} | {r['pairs_per_cpu_second'] / t['pairs_per_cpu_second']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
