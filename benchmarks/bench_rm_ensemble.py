"""Does a reward-model ensemble (Coste et al. 2023) make PPO climb gold further, or over-optimise less?

    python benchmarks/bench_rm_ensemble.py --task extreme --seeds 0 1 2
    python benchmarks/bench_rm_ensemble.py --task spurious --reuse runs/bench/spurious_s0   # reuse SFT + RM
    python benchmarks/bench_rm_ensemble.py --report runs/bench_rm_ensemble/*/results.json

Per task and seed, from one SFT policy and the task config's reward model (``configs/pipeline/<task>.yaml``,
seed s; ``--reuse DIR`` takes them from a ``bench_pipeline_trl.py`` workdir, ``DIR/seed<s>/alignkit``):

* ``k - 1`` more reward models with the same config and seeds s+1 .. s+k-1 (what ``rm.ensemble: k`` trains);
* PPO from the same SFT with the single reward model and with the ensemble, read as
  ``mean - lambda * std`` over members (uncertainty-weighted optimisation) and as their minimum
  (worst-case optimisation); same updates, same settings otherwise; and each again for twice the updates
  (``--long-factor``), the over-optimisation check;
* every policy evaluated by the same code as the pipeline report (``pipeline.compare_policies``: 256
  held-out prompts x 2 samples, gold reward, KL to SFT).

Everything runs in this one process with ``--threads`` torch threads, one run after another.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="review")
    p.add_argument("--config", default=None, help="pipeline YAML (default configs/pipeline/<task>.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--k", type=int, default=3, help="reward models in the ensemble")
    p.add_argument("--variants", default="single,mean_minus_std,min",
                   help="single (one reward model), and ensemble combinations: mean_minus_std, min, mean")
    p.add_argument("--uncertainty-coef", type=float, default=1.0, help="lambda of mean_minus_std")
    p.add_argument("--long-factor", type=int, default=2, help="also run PPO for this many times its updates (0: no)")
    p.add_argument("--long-variants", default="single,mean_minus_std")
    p.add_argument("--reuse", default=None, help="bench_pipeline_trl workdir whose seed<s>/alignkit SFT and RM "
                                                 "(and, for single at 1x, PPO) are reused")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline config override, e.g. --set ppo.train.max_steps=50 (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--report", nargs="+", metavar="RESULTS_JSON")
    args = p.parse_args(argv)
    args.config = args.config or os.path.join(ROOT, "configs/pipeline", f"{args.task}.yaml")
    args.workdir = args.workdir or os.path.join(ROOT, "runs/bench_rm_ensemble", args.task)
    return args


def run_seed(args, seed: int) -> dict:
    from alignkit.config import load_config, parse_overrides
    from alignkit.pipeline import PipelineConfig, compare_policies, summarize, wire
    from alignkit.ppo import train_ppo
    from alignkit.rm import ensemble_member, train_one_rm
    from alignkit.sft import train_sft

    base = os.path.join(args.workdir, f"seed{seed}")
    overrides = [f"--output_dir={base}"] + [f"--{s}.train.seed={seed}" for s in ("sft", "rm", "ppo")]
    overrides += ["--ppo.log.progress=false", "--rm.log.progress=false", "--sft.log.progress=false"]
    overrides += [f"--{kv}" for kv in args.set]
    cfg = wire(load_config(PipelineConfig, args.config, parse_overrides(overrides + [f"--rm.rm.ensemble={args.k}"])))
    os.makedirs(base, exist_ok=True)
    reused = os.path.join(args.reuse, f"seed{seed}", "alignkit") if args.reuse else None
    for stage in ("sft", "rm"):
        if reused and not os.path.exists(os.path.join(base, stage)):
            os.symlink(os.path.abspath(os.path.join(reused, stage)), os.path.join(base, stage))
    seconds = {}
    t = time.time()
    if not os.path.exists(os.path.join(cfg.sft.output_dir, "final")):
        train_sft(cfg.sft)
    seconds["sft"] = time.time() - t
    members = []
    for i in range(args.k):
        member = ensemble_member(cfg.rm, i)
        t = time.time()
        if not os.path.exists(os.path.join(member.output_dir, "final")):
            train_one_rm(member)
        seconds[f"rm_member_{i}"] = time.time() - t
        members.append(os.path.join(member.output_dir, "final"))
    updates = cfg.ppo.train.max_steps
    policies = {}
    runs = [(v, 1) for v in args.variants.split(",")]
    if args.long_factor:
        runs += [(v, args.long_factor) for v in args.long_variants.split(",")]
    runs.sort(key=lambda r: r[0] == "single")  # last: with --reuse, bench_pipeline_trl may have run them by then
    for variant, factor in runs:
        name = f"{variant}_x{factor}"
        done = (os.path.join(reused, "ppo", "final") if factor == 1 else
                os.path.join(os.path.dirname(reused), f"alignkit_{factor}x", "ppo", "final")) if reused else None
        if variant == "single" and done and os.path.exists(done):  # bench_pipeline_trl's own runs
            policies[name] = done
            continue
        ppo = copy.deepcopy(cfg.ppo)
        ppo.output_dir = os.path.join(base, f"ppo_{name}")
        ppo.train.max_steps = updates * factor
        src = ppo.reward.sources[0]
        if variant == "single":
            ppo.reward.sources = [dataclasses.replace(src, members=[])]
        else:
            ppo.reward.sources = [dataclasses.replace(src, members=members, combine=variant,
                                                      uncertainty_coef=args.uncertainty_coef)]
        if not os.path.exists(os.path.join(ppo.output_dir, "final")):
            t = time.time()
            print(f"seed {seed}: PPO {name} ({ppo.train.max_steps} updates)", flush=True)
            train_ppo(ppo)
            seconds[f"ppo_{name}"] = time.time() - t
        policies[name] = os.path.join(ppo.output_dir, "final")
    results = {"seconds": seconds, "members": members, "eval": {}}
    for name, path in policies.items():
        rep = summarize(compare_policies(os.path.join(cfg.sft.output_dir, "final"), path, members[0], cfg))
        results["eval"][name] = {"gain": rep["gold_gain_in_sft_std"], "kl": rep["ppo"]["kl_to_sft"],
                                 "gold": rep["ppo"]["gold_reward"], "sft_gold": rep["sft"]["gold_reward"],
                                 "win": rep["ppo_win_rate_vs_sft"], "length": rep["ppo"]["response_length"]}
        e = results["eval"][name]
        print(f"seed {seed} {name}: {e['gain']:+.2f} SFT std at KL {e['kl']:.2f} (win {e['win']:.0%})", flush=True)
    return results


def print_table(results: dict) -> None:
    seeds = results["seeds"]
    names = sorted({n for r in seeds.values() for n in r["eval"]}, key=lambda n: (n.split("_x")[1], n))
    print(f"\n{results['task']}: gold gain in SFT std / KL to SFT, per seed and mean +- SE")
    for n in names:
        rows = [(r["eval"][n]["gain"], r["eval"][n]["kl"]) for r in seeds.values() if n in r["eval"]]
        g = [x for x, _ in rows]
        k = [y for _, y in rows]
        se = (lambda xs: (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5
              if len(xs) > 1 else 0.0)
        cells = "  ".join(f"{a:+.2f}/{b:.2f}" for a, b in rows)
        print(f"  {n:22s} {cells}   mean {sum(g) / len(g):+.2f} +- {se(g):.2f} at KL {sum(k) / len(k):.2f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        for path in args.report:
            with open(path) as f:
                print_table(json.load(f))
        return
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    out = os.path.join(args.workdir, "results.json")
    results = {"task": args.task, "args": vars(args), "seeds": {}}
    if os.path.exists(out):
        with open(out) as f:
            results["seeds"] = json.load(f)["seeds"]
    for seed in args.seeds:
        results["seeds"][str(seed)] = run_seed(args, seed)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    print_table(results)


if __name__ == "__main__":
    main()
