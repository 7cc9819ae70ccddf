"""Plots a person would rather look at than read: reward distributions, PPO curves, the pipeline report.

Each writes one PNG (matplotlib, Agg backend) and returns its path.
"""

from __future__ import annotations

import math
import os

import torch

from alignkit.engine import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_distributions(dists: dict, path: str) -> str | None:
    """PNG histogram of chosen vs rejected rewards, one panel per aspect."""
    if not dists:
        return None
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(dists), figsize=(5 * len(dists), 3.5), squeeze=False)
    for ax, (aspect, (chosen, rejected)) in zip(axes[0], sorted(dists.items())):
        lo, hi = min(chosen + rejected), max(chosen + rejected)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (n={len(chosen)})", color="tab:green")
        ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (n={len(rejected)})", color="tab:red")
        ax.set_title(f"reward: {aspect}")
        ax.set_xlabel("raw score" if aspect != "combined" else "combined normalised reward")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PLOTTED = ["objective/score", "objective/gold_reward", "objective/kl", "train/kl_coef", "objective/non_score_reward",
           "policy/entropy", "policy/clipfrac", "policy/approx_kl", "loss/value", "loss/kl", "value/explained_variance",
           "rollout/response_length", "rollout/eos_share"]


def plot_metrics(output_dir: str) -> str | None:
    """output_dir/curves.png: one panel per logged PPO statistic (held-out evals as points)."""
    plt = _pyplot()

    rows = read_metrics(output_dir)
    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    if not keys:
        return None
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 2.8 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), lw=1.2)
        ev = {"objective/score": "eval/score", "objective/gold_reward": "eval/gold_reward", "objective/kl": "eval/kl"}
        if key in ev:
            epts = [(r["step"], r[ev[key]]) for r in rows if ev[key] in r]
            if epts:
                ax.plot(*zip(*epts), "o--", ms=4, label="held-out")
                ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("PPO update", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(output_dir, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


COLORS = {"sft": "tab:gray", "ppo": "tab:blue", "rloo": "tab:orange", "grpo": "tab:green", "dpo": "tab:red",
          "kto": "tab:purple"}


def plot_report(records: dict, rep: dict, path: str, run_dirs: dict) -> str:
    """The pipeline report: gold and learned reward histograms of SFT and each optimised policy,
    KL / length / EOS / judged-good bars side by side, and held-out gold during online training.

    records, rep: ``pipeline.compare_policies`` / ``pipeline.summarize``; run_dirs: {policy: its output_dir}.
    """
    plt = _pyplot()
    names = list(records)  # "sft" first
    color = {n: COLORS.get(n, f"C{i}") for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    lo = min(records[n]["gold"].min().item() for n in names)
    hi = max(records[n]["gold"].max().item() for n in names)
    bins = torch.linspace(lo, hi if hi > lo else lo + 1, 30).tolist()
    for n in names:
        wins = f", wins {rep[n]['win_rate_vs_sft']:.0%}" if "win_rate_vs_sft" in rep[n] else ""
        ax.hist(records[n]["gold"].tolist(), bins=bins, histtype="step", lw=1.6, color=color[n],
                label=f"{n.upper()} mean {rep[n]['gold_reward']:.2f}{wins}")
    ax.set_title("Gold reward on held-out prompts (win rate vs SFT)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    if "learned" in records["sft"]:
        for n in names:
            ax.hist(records[n]["learned"].tolist(), bins=30, histtype="step", lw=1.6, color=color[n],
                    label=f"{n.upper()} mean {rep[n]['learned_reward']:.2f}")
        ax.set_title("Learned (reward model) reward")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    ax = axes[1, 0]
    bars = [("kl_to_sft", "KL to SFT\n(nats)", 1.0), ("response_length", "length / 10", 0.1),
            ("eos_share", "EOS share", 1.0)]
    if "judged_good_share" in rep["sft"]:
        bars.append(("judged_good_share", "judged good\n(evaluator)", 1.0))
    x = torch.arange(len(bars)).float()
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar((x - 0.4 + width * (i + 0.5)).tolist(), [rep[n][k] * f for k, _, f in bars], width=width,
               color=color[n], label=n.upper())
    ax.set_xticks(x.tolist(), [label for _, label, _ in bars])
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    plotted = False
    for n, run_dir in run_dirs.items():
        rows = [m for m in read_metrics(run_dir) if "eval/gold_reward" in m]
        if rows:
            ax.plot([m["step"] for m in rows], [m["eval/gold_reward"] for m in rows], "o-", color=color[n],
                    label=n.upper())
            plotted = True
    if plotted:
        ax.set_xlabel("update")
        ax.set_title("Held-out gold reward during online training")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_rm_diagnostics(diag: dict, path: str) -> str:
    """PNG of the reward-model diagnostics (``rm_eval.diagnose``): the best-of-N curve (gold and reward-model
    score of the RM's best of N policy samples against KL = log N - (N-1)/N, Gao et al. 2022), accuracy by
    gold gap, and the calibration of P(chosen)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    bon = diag["best_of_n"]
    kl = [r["kl"] for r in bon]
    ax.plot(kl, [r["gold"] for r in bon], "o-", color="tab:orange", label="gold of RM's best")
    ax.plot(kl, [r["oracle_gold"] for r in bon], ":", color="tab:gray", label="gold's own best (oracle)")
    ax.set_xlabel("KL(best-of-N || policy), nats")
    ax.set_ylabel("gold reward")
    for r in bon:
        ax.annotate(f"N={r['n']}", (r["kl"], r["gold"]), fontsize=7)
    twin = ax.twinx()
    twin.plot(kl, [r["score"] for r in bon], "s--", color="tab:blue", label="RM score of RM's best")
    twin.set_ylabel("reward-model score", color="tab:blue")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("best of N policy samples")
    ax = axes[1]
    buckets = diag["accuracy_by_gold_gap"]
    names = list(buckets)
    ax.bar(range(len(names)), [buckets[k]["accuracy"] or 0.0 for k in names], color="tab:green")
    ax.set_xticks(range(len(names)), [f"{k}\n{buckets[k]['pairs']} pairs" for k in names], fontsize=7)
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_ylim(0, 1)
    ax.set_title("accuracy by |gold gap| (same prompt)")
    ax = axes[2]
    cal = diag.get("calibration")
    if cal:
        ax.plot([b["predicted"] for b in cal["bins"]], [b["observed"] for b in cal["bins"]], "o-",
                label=f"ECE {cal['ece']:.3f}")
        ax.legend()
    ax.plot([0, 1], [0, 1], ":", color="k")
    ax.set_xlabel("predicted P(chosen)")
    ax.set_ylabel("observed share chosen")
    rng = diag["score_range"]
    ax.set_title(f"calibration; scores p1..p99 {rng['p1']:.2f}..{rng['p99']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
