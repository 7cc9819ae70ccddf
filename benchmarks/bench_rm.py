"""Reward-model training speed: alignkit vs TRL 1.16 RewardTrainer on the same model, pairs, max length and batch.

    python benchmarks/bench_rm.py                      # pairs and K=4 rankings, builtin:small
    python benchmarks/bench_rm.py --model builtin:tiny --steps 40 --kinds pairs
    python benchmarks/bench_rm.py --repeats 5 --no-packing   # alignkit padded, like TRL

Each run is one subprocess (so peak RSS is its own) on identical token ids: the pairs alignkit
trains on are handed to TRL pre-tokenized (``chosen_ids``/``rejected_ids``). Both use bf16 (--precision)
autocast, no gradient checkpointing (TRL's fastest setting on CPU), AdamW, the same learning rate,
linear schedule without warmup, and the same number of pairs per optimizer step.

* pairs: K=2 rows; alignkit batches B prompts (2B answers), TRL B pairs (2B sequences).
* rankings: K=4 rows; alignkit puts each prompt's C(4,2)=6 pairs in one element, so each answer is
  scored once (4 forward sequences per prompt); TRL trains the same 6 pairs as 6 rows (12 sequences).
* alignkit packs (data.packing, its default): each micro-batch's answers go into rows with a tree mask,
  the prompt once per element; TRL pads every chosen/rejected sequence to the longest in its batch.

Both are timed the same way, not from their own logs: a global optimizer-step hook stamps wall and
process CPU time after every step; pairs/s = pairs of steps 2..N / time from the end of step 1 to the
end of step N (start-up, the first step's warm-up, evaluation and saving excluded). pairs/CPU-s uses
the CPU time instead: with 1 thread it moves much less than wall time when other jobs share the cores.
Also reported: peak RSS, forward sequences per prompt, held-out gold accuracy of both trained models
(scored the same way) on builtin:pairs:eval. On a shared 2-core CPU use --repeats (medians).
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


def elements_for(kind: str, n: int, tokenizer, max_length: int):
    from alignkit import rewards, rm, rm_data, rm_eval
    from alignkit.schema import load_examples

    spec = f"builtin:{kind}:train:{n}"
    els, _ = rm_data.build_elements(load_examples(spec), rm_data.RewardSettings(), tokenizer, max_length, "error")
    return spec, els


def gold_accuracy(model, tokenizer, max_length: int) -> float:
    from alignkit import rewards, rm, rm_data, rm_eval
    from alignkit.schema import load_examples

    els, _ = rm_data.build_elements(load_examples("builtin:pairs:eval"), rm_data.RewardSettings(), tokenizer, max_length,
                               "truncate", evaluation=True)
    model = model.float().eval()
    return rm_eval.evaluate(model, els, rewards.default_info(1), model.config.pad_token_id)[0]["gold_accuracy"]


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


def run_alignkit(args) -> dict:
    from alignkit import rewards, rm, rm_data, rm_eval
    from alignkit.config import load_config
    from alignkit.modeling import load_tokenizer

    out = tempfile.mkdtemp(prefix="bench-rm-alignkit-")
    cfg = load_config(rm.RMConfig, data={
        "model": {"name_or_path": args.model},
        "data": {"train_files": [f"builtin:{args.kind}:train:{args.rows}"], "eval_files": [],
                 "max_length": args.max_length, "packing": not args.no_packing},
        "train": {"max_steps": args.steps, "per_device_batch_size": args.prompts_per_step,
                  "learning_rate": args.lr, "lr_scheduler": "linear", "warmup_ratio": 0.0,
                  "mixed_precision": args.precision, "log_every": args.steps, "save_every": 0, "seed": 0},
        "log": {"progress": False}, "rm": {"normalize_on": ["builtin:sft:train:8"]}, "output_dir": out})
    clock = StepClock()
    summary = rm.train_rm(cfg)
    clock.handle.remove()
    tok = load_tokenizer(cfg.model)
    model, _, _ = rewards.load_reward_model(os.path.join(out, "final"))
    pairs = summary["pairs_per_second"] * summary["runtime_seconds"]
    per_step = args.prompts_per_step * (1 if args.kind == "pairs" else 6)
    if abs(pairs - args.steps * per_step) > 0.02 * args.steps * per_step:  # runtime_seconds is rounded
        raise RuntimeError(f"alignkit trained {pairs:.0f} pairs, expected {args.steps} x {per_step}")
    k = 2 if args.kind == "pairs" else 4
    return {**clock.rates(per_step), "seconds": summary["runtime_seconds"], "pairs": args.steps * per_step,
            "forward_sequences_per_prompt": k, "gold_accuracy": gold_accuracy(model, tok, args.max_length)}


def _Clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        begin = end = 0.0

        def on_train_begin(self, *a, **k):
            self.begin = time.time()

        def on_train_end(self, *a, **k):
            self.end = time.time()

    return Clock()


def run_trl(args) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer, resolve_path

    tok = load_tokenizer(ModelConfig(name_or_path=args.model))
    _, els = elements_for(args.kind, args.rows, tok, args.max_length)
    rows = [{"chosen_ids": el.sequences[c.winner], "rejected_ids": el.sequences[c.loser]}
            for el in els for c in el.comparisons if not c.tie]
    pairs_per_prompt = 1 if args.kind == "pairs" else 6
    batch = args.prompts_per_step * pairs_per_prompt  # the same pairs per optimizer step as alignkit
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(args.model), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    out = tempfile.mkdtemp(prefix="bench-rm-trl-")
    cfg = RewardConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=batch,
                       learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, bf16=args.precision == "bf16",
                       gradient_checkpointing=False, max_length=args.max_length, logging_steps=args.steps,
                       save_strategy="no", report_to=[], seed=0, dataloader_drop_last=True,
                       use_cpu=True, disable_tqdm=True)
    clock = _Clock()
    steps = StepClock()
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok, callbacks=[clock])
    trainer.train()
    steps.handle.remove()
    seconds = clock.end - clock.begin  # the training loop only, like alignkit's runtime_seconds
    pairs = args.steps * batch
    return {**steps.rates(batch), "seconds": round(seconds, 2), "pairs": pairs,
            "forward_sequences_per_prompt": 2 * pairs_per_prompt,
            "gold_accuracy": gold_accuracy(trainer.model, tok, args.max_length)}


def child(args) -> None:
    result = run_alignkit(args) if args.run == "alignkit" else run_trl(args)
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH_RESULT " + json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--kinds", nargs="+", default=["pairs", "rankings"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=8, help="pairs per step for K=2; prompts for K=4")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each run (both the same); on a shared 2-core CPU, 2 threads oversubscribe")
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="mixed precision of both runs")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate alignkit and TRL runs this many times and report the median (noisy shared CPU)")
    p.add_argument("--no-packing", action="store_true", help="alignkit with data.packing=false (padded batches)")
    p.add_argument("--run", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--kind", default="pairs", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        return child(args)
    results = {}
    for kind in args.kinds:
        rows = args.steps * args.prompts_per_step + 64  # enough rows for every step (a few ties are dropped)
        for _ in range(args.repeats):
            for lib in ("alignkit", "trl"):
                cmd = [sys.executable, __file__, "--run", lib, "--kind", kind, "--rows", str(rows),
                       "--model", args.model, "--steps", str(args.steps), "--prompts-per-step",
                       str(args.prompts_per_step), "--max-length", str(args.max_length), "--lr", str(args.lr),
                       "--precision", args.precision] + (["--no-packing"] if args.no_packing else [])
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{lib} {kind} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(line[0].split(" ", 1)[1])
                results.setdefault((kind, lib), []).append(r)
                print(f"  {kind:<9} {lib:<9} {r}", file=sys.stderr)
    print(f"\nmodel {args.model}, {args.steps} steps, {args.prompts_per_step} prompts/step, max_length "
          f"{args.max_length}, precision {args.precision}, {args.threads} thread(s), alignkit packing "
          f"{'off' if args.no_packing else 'on'}, median of {args.repeats} alternating run(s)\n")
    print(f"{'data':<10}{'trainer':<10}{'pairs/s':>9}{'ratio':>7}{'pairs/CPU-s':>13}{'ratio':>7}{'fwd seq/prompt':>16}"
          f"{'peak RSS MB':>13}{'gold acc':>10}   pairs/s (pairs/CPU-s) of each run")
    for kind in args.kinds:
        runs = {lib: results[(kind, lib)] for lib in ("alignkit", "trl")}
        med = {lib: {k: _median(runs[lib], k) for k in ("pairs_per_second", "pairs_per_cpu_second", "peak_rss_mb",
                                                         "gold_accuracy")} for lib in runs}
        for lib in ("alignkit", "trl"):
            r = med[lib]
            each = " ".join(f"{x['pairs_per_second']:.0f}({x['pairs_per_cpu_second']:.0f})" for x in runs[lib])
            print(f"{kind:<10}{lib:<10}{r['pairs_per_second']:>9.1f}"
                  f"{r['pairs_per_second'] / med['trl']['pairs_per_second']:>7.2f}{r['pairs_per_cpu_second']:>13.1f}"
                  f"{r['pairs_per_cpu_second'] / med['trl']['pairs_per_cpu_second']:>7.2f}"
                  f"{runs[lib][0]['forward_sequences_per_prompt']:>16}{r['peak_rss_mb']:>13.0f}"
                  f"{r['gold_accuracy']:>10.3f}   {each}")


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


if __name__ == "__main__":
    main()
