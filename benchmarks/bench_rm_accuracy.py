"""Reward-model held-out gold accuracy: alignkit vs TRL 1.16 RewardTrainer over several seeds, same pairs.

    python benchmarks/bench_rm_accuracy.py                       # 5 seeds, pairs + K=4 rankings, TRL sweep on seed 0 (~30 min)
    python benchmarks/bench_rm_accuracy.py --jobs 2              # two runs at a time (2 cores; accuracy is not timing)
    python benchmarks/bench_rm_accuracy.py --kinds rankings --trl-batch 24 --trl-lr 1e-3   # no sweep
    python benchmarks/bench_rm_accuracy.py --kinds rankings --alignkit-set rm.rankings=plackett_luce \
        --trl-from runs/bench_rm_accuracy.json --json runs/bench_rm_accuracy_pl.json   # listwise loss, TRL runs reused

What is compared, per seed s and kind (pairs: configs/rm/tiny.yaml, rankings: configs/rm/tiny_ranking.yaml):

* alignkit: ``train_rm`` with the shipped config, ``train.seed=s`` (which also picks the built-in training
  rows and their order), one epoch as the config says; ``--alignkit-set`` adds overrides (e.g. the listwise
  ``rm.rankings=plackett_luce``). Its own evaluation is switched off (``data.eval_files=[]``); it changes
  nothing in training.
* TRL: ``RewardTrainer`` on exactly the comparison pairs alignkit trains on -- the config's training
  elements from ``rm_data.prepare_rm_data`` at the same seed, each untied comparison one ``chosen_ids`` /
  ``rejected_ids`` row of the same token ids (a K=4 ranking gives its 6 pairs as 6 rows) -- same model
  (builtin:tiny, score head drawn after ``set_seed(s)``), same max_length, one epoch (so the same pairs
  seen, each once), bf16, AdamW, no gradient checkpointing, linear schedule with 5% warm-up (alignkit's
  configs also warm up 5%). TRL's batch size and learning rate are its own best: a sweep on seed 0 over
  ``--trl-batches`` x ``--trl-lrs`` (by default: the same pairs per optimizer step as alignkit -- 16 for
  pairs, 4 prompts x 6 = 24 for rankings -- and a per-pair batch of 4 rows, i.e. 4-6x more optimizer
  steps; lr 3e-4, 1e-3, 3e-3), scored by the same gold accuracy, and the best is then used for every
  seed. Choosing it on the evaluation pairs can only flatter TRL. Chosen (see benchmarks/README.md):
  the per-pair batch of 4 rows for both kinds, lr 3e-4 for pairs and 1e-3 for rankings -- smaller batches,
  i.e. more optimizer steps for the same pairs (1500 vs alignkit's 250 on rankings), were TRL's best.

Both trained models are scored the same way: ``bench_rm.gold_accuracy`` -- the share of answer pairs of
``builtin:pairs:eval`` (seed 0, 220 pairs with different gold reward) that the model orders like the
task's gold reward, in fp32. Reported: per seed, mean +- standard error over seeds, and the paired
difference alignkit - TRL (same seed, so same training pairs) with its standard error. Every run is its
own subprocess with 1 torch thread; the JSON of all runs goes to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_rm import gold_accuracy  # noqa: E402
from common import emit, print_table, run_child  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"pairs": "configs/rm/tiny.yaml", "rankings": "configs/rm/tiny_ranking.yaml"}


# ----------------------------------------------------------------------------- child side


def load_rm_config(kind: str, seed: int, out: str, extra: list[str]):
    from alignkit import rewards, rm, rm_data, rm_eval
    from alignkit.config import load_config

    return load_config(rm.RMConfig, os.path.join(ROOT, CONFIGS[kind]), [
        f"train.seed={seed}", "train.num_threads=1", "data.eval_files=[]", "log.progress=false",
        "train.save_every=0", f"output_dir={out}", *extra])


def run_alignkit(args) -> dict:
    from alignkit import rewards, rm, rm_data, rm_eval
    from alignkit.modeling import load_tokenizer

    out = tempfile.mkdtemp(prefix="bench-rmacc-alignkit-")
    cfg = load_rm_config(args.kind, args.seed, out, args.alignkit_set)
    summary = rm.train_rm(cfg)
    model, _, _ = rewards.load_reward_model(os.path.join(out, "final"))
    data = summary["data"]["train"]
    pairs = data.get("pairs", 0) + 6 * data.get("rankings", 0)  # a K=4 Plackett-Luce ranking implies 6 pairs
    return {"gold_accuracy": gold_accuracy(model, load_tokenizer(cfg.model), cfg.data.max_length),
            "steps": summary["steps"], "pairs": pairs, "batch": cfg.train.per_device_batch_size,
            "lr": cfg.train.learning_rate, "train_accuracy": summary["train_accuracy"],
            "seconds": summary["runtime_seconds"], "overrides": args.alignkit_set}


def trl_rows(kind: str, seed: int) -> tuple[list[dict], object, object]:
    """The untied comparisons alignkit trains on at this seed, as TRL's pre-tokenized rows."""
    from alignkit import rewards, rm, rm_data, rm_eval
    from alignkit.modeling import load_tokenizer

    cfg = load_rm_config(kind, seed, tempfile.mkdtemp(prefix="bench-rmacc-trl-"), ["rm.rankings=pairs"])
    tok = load_tokenizer(cfg.model)
    elements, _, _, _ = rm_data.prepare_rm_data(cfg, tok)
    rows = [{"chosen_ids": el.sequences[c.winner], "rejected_ids": el.sequences[c.loser]}
            for el in elements for c in el.comparisons if not c.tie]
    return rows, cfg, tok


def run_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from alignkit.modeling import resolve_path

    torch.set_num_threads(1)
    rows, cfg, tok = trl_rows(args.kind, args.seed)
    set_seed(args.seed)  # the random score head, like alignkit's seed_everything before load_model
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(cfg.model.name_or_path), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    tcfg = RewardConfig(output_dir=cfg.output_dir, num_train_epochs=1, per_device_train_batch_size=args.batch,
                        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=cfg.train.warmup_ratio,
                        bf16=True, gradient_checkpointing=False, max_length=cfg.data.max_length,
                        max_grad_norm=cfg.train.max_grad_norm, logging_steps=50, save_strategy="no", report_to=[],
                        seed=args.seed, data_seed=args.seed, dataloader_drop_last=False, use_cpu=True,
                        disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=tcfg, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok)
    if len(trainer.train_dataset) != len(rows):  # TRL drops rows longer than max_length: none may be
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs")
    result = trainer.train()
    return {"gold_accuracy": gold_accuracy(trainer.model, tok, cfg.data.max_length),
            "steps": trainer.state.global_step, "pairs": len(rows), "batch": args.batch, "lr": args.lr,
            "train_loss": result.training_loss, "seconds": round(result.metrics["train_runtime"], 2)}


def child(args) -> None:
    emit(run_alignkit(args) if args.run == "alignkit" else run_trl(args))


# ----------------------------------------------------------------------------- parent side


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def launch(args, jobs: list[dict]) -> list[dict]:
    """Run every job (dict of child flags) in its own 1-thread subprocess, ``args.jobs`` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = tempfile.mkdtemp(prefix="bench-rmacc-logs-")

    def one(i_job):
        i, job = i_job
        argv = [sys.executable, os.path.abspath(__file__), "--run", job["run"], "--kind", job["kind"],
                "--seed", str(job["seed"])]
        if job["run"] == "trl":
            argv += ["--batch", str(job["batch"]), "--lr", repr(job["lr"])]
        for o in job.get("alignkit_set", []):
            argv += ["--alignkit-set", o]
        r = run_child(argv, os.path.join(logs, f"{i:03d}-{job['run']}-{job['kind']}-{job['seed']}.log"), env)
        r = {**job, **r}
        print(f"  {job['kind']:<9} {job['run']:<9} seed {job['seed']} batch {r['batch']} lr {r['lr']:g}: "
              f"gold {r['gold_accuracy']:.4f}, {r['steps']} steps, {r['pairs']} pairs, {r['wall_seconds']:.0f}s",
              file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, enumerate(jobs)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["pairs", "rankings"], choices=sorted(CONFIGS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--trl-batches", default="same,4",
                   help="TRL batch sizes (rows = pairs per step) swept on seed 0; 'same' = alignkit's pairs per step")
    p.add_argument("--trl-lrs", default="3e-4,1e-3,3e-3", help="TRL learning rates swept on seed 0")
    p.add_argument("--trl-batch", type=int, help="skip the sweep: TRL batch for every seed (with --trl-lr)")
    p.add_argument("--trl-lr", type=float, help="skip the sweep: TRL learning rate for every seed")
    p.add_argument("--trl-from", metavar="JSON",
                   help="reuse the TRL runs (and its chosen settings) of an earlier --json of this script instead of "
                        "training TRL again: TRL's rows do not depend on alignkit's overrides")
    p.add_argument("--alignkit-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override of the alignkit runs (repeatable), e.g. rm.rankings=plackett_luce")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each 1 thread)")
    p.add_argument("--json", default="runs/bench_rm_accuracy.json", help="where to write every run's result")
    p.add_argument("--run", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--kind", default="pairs", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        return child(args)
    if (args.trl_batch is None) != (args.trl_lr is None):
        p.error("--trl-batch and --trl-lr go together")
    same = {"pairs": 16, "rankings": 24}  # alignkit's pairs per optimizer step in the shipped configs
    seeds = list(range(args.seeds))
    ak = [{"run": "alignkit", "kind": k, "seed": s, "alignkit_set": args.alignkit_set}
          for k in args.kinds for s in seeds]
    trl_best, sweep, reused = {}, [], []
    if args.trl_from:
        with open(args.trl_from, encoding="utf-8") as f:
            earlier = json.load(f)
        for k in args.kinds:
            trl_best[k] = (earlier["trl_best"][k]["batch"], earlier["trl_best"][k]["lr"])
            reused += [r for r in earlier["kinds"][k]["trl"] if r["seed"] in seeds]
            if {r["seed"] for r in reused if r["kind"] == k} != set(seeds):
                p.error(f"--trl-from {args.trl_from}: no TRL run of every seed {seeds} for {k}")
    elif args.trl_batch is None:
        batches = {k: sorted({same[k] if b == "same" else int(b) for b in args.trl_batches.split(",")}, reverse=True)
                   for k in args.kinds}
        lrs = [float(x) for x in args.trl_lrs.split(",")]
        sweep = [{"run": "trl", "kind": k, "seed": 0, "batch": b, "lr": lr}
                 for k in args.kinds for b in batches[k] for lr in lrs]
    else:
        trl_best = {k: (args.trl_batch, args.trl_lr) for k in args.kinds}
    # alignkit's runs and the sweep first (they do not depend on each other), then TRL's other seeds.
    done = launch(args, ak + sweep)
    ak_runs, sweep_runs = done[:len(ak)], done[len(ak):]
    for k in args.kinds:
        if k not in trl_best:
            best = max((r for r in sweep_runs if r["kind"] == k), key=lambda r: r["gold_accuracy"])
            trl_best[k] = (best["batch"], best["lr"])
    rest = [{"run": "trl", "kind": k, "seed": s, "batch": trl_best[k][0], "lr": trl_best[k][1]}
            for k in args.kinds for s in seeds
            if not any(r["kind"] == k and r["seed"] == s and (r["batch"], r["lr"]) == trl_best[k] for r in sweep_runs)]
    if reused:
        rest = []
    trl_runs = launch(args, rest) if rest else []
    trl_runs += [r for r in sweep_runs if (r["batch"], r["lr"]) == trl_best[r["kind"]]] + reused

    report = {"seeds": seeds, "alignkit_overrides": args.alignkit_set, "trl_from": args.trl_from,
              "trl_sweep": sweep_runs,
              "trl_best": {k: {"batch": b, "lr": lr} for k, (b, lr) in trl_best.items()}, "kinds": {}}
    if sweep_runs:
        print("\nTRL sweep on seed 0 (gold accuracy):\n")
        print_table([[r["kind"], r["batch"], f"{r['lr']:g}", r["steps"], f"{r['gold_accuracy']:.4f}"]
                     for r in sweep_runs], ["kind", "TRL batch (pairs/step)", "lr", "steps", "gold acc"])
    for k in args.kinds:
        a = {r["seed"]: r for r in ak_runs if r["kind"] == k}
        t = {r["seed"]: r for r in trl_runs if r["kind"] == k}
        for s in seeds:
            if a[s]["pairs"] != t[s]["pairs"]:
                raise RuntimeError(f"{k} seed {s}: alignkit saw {a[s]['pairs']} pairs, TRL {t[s]['pairs']}")
        acc_a = [a[s]["gold_accuracy"] for s in seeds]
        acc_t = [t[s]["gold_accuracy"] for s in seeds]
        diff = [x - y for x, y in zip(acc_a, acc_t)]
        (ma, sa), (mt, st), (md, sd) = mean_se(acc_a), mean_se(acc_t), mean_se(diff)
        report["kinds"][k] = {"config": CONFIGS[k], "alignkit": [a[s] for s in seeds], "trl": [t[s] for s in seeds],
                              "alignkit_mean": ma, "alignkit_se": sa, "trl_mean": mt, "trl_se": st,
                              "diff_mean": md, "diff_se": sd}
        ab, tb = a[0], t[0]
        print(f"\n{k}: {CONFIGS[k]}{' ' + ' '.join(args.alignkit_set) if args.alignkit_set else ''}; "
              f"{ab['pairs']} pairs seen by both (seed 0); alignkit {ab['steps']} steps of {ab['batch']} prompts, "
              f"lr {ab['lr']:g}; TRL {tb['steps']} steps of {tb['batch']} pairs, lr {tb['lr']:g}\n")
        rows = [[s, f"{x:.4f}", f"{y:.4f}", f"{x - y:+.4f}"] for s, x, y in zip(seeds, acc_a, acc_t)]
        rows.append(["mean +- SE", f"{ma:.4f} +- {sa:.4f}", f"{mt:.4f} +- {st:.4f}", f"{md:+.4f} +- {sd:.4f}"])
        print_table(rows, ["seed", "alignkit gold acc", "TRL gold acc", "alignkit - TRL"])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"\nall runs: {args.json}")


if __name__ == "__main__":
    main()
