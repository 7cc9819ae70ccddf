"""Reward-model evaluation: held-out accuracy (by strength, aspect and against gold), calibration, and the
diagnostics that tell a user *before* PPO whether a reward model can guide it (:func:`diagnose`: accuracy by
gold gap and among the top decile, the score range in use, the best-of-N curve of Gao et al. 2022), and
``alignkit rm-eval``.

    alignkit rm-eval --model runs/rm-tiny/final --data builtin:pairs:eval --json
    alignkit rm-eval --model runs/extreme/rm/final --data builtin:extreme/pairs:eval \
        --policy runs/extreme/sft/final --prompts builtin:extreme/prompts:eval --best-of-n 64 --out runs/extreme/rm

Scores come from ``alignkit.rewards`` (the one reader every stage uses).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict

import torch

from alignkit import engine
from alignkit.config import ConfigError, DataConfig, ModelConfig
from alignkit.modeling import disable_dropout, load_tokenizer
from alignkit.plots import plot_distributions, plot_rm_diagnostics
from alignkit.rewards import (RewardSourceConfig, build_reward, combined_reward, load_reward_model, reward_pad_id,
                              score_sequences)
from alignkit.rm_data import COMBINED, OVERALL, RewardSettings, RMElement, _aspect_name, build_elements
from alignkit.rollout import decode_responses, left_pad, load_prompts, sample, truncate_after_eos
from alignkit.schema import load_examples
from alignkit.tasks import gold_reward
from alignkit.tokenization import stop_token_ids


@torch.no_grad()
def evaluate(model, elements: list[RMElement], info: dict, pad_token_id: int, accelerator=None,
             batch_size: int = 32) -> tuple[dict, dict]:
    """Held-out metrics -> (metrics, distributions).

    accuracy: share of untied labelled pairs where the winner scores strictly higher (an equal
    score is wrong, as RewardBench counts); also by strength and by aspect; mean margin
    r_winner - r_loser; gold_accuracy: for rows with ``meta.gold``, the share of answer pairs
    with different gold reward that the combined reward orders like gold (per aspect from
    ``meta.gold_aspects``). The elements are sharded over processes and the records gathered.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = elements[rank::world]
    seqs = [s for el in mine for s in el.sequences if s]
    raw = score_sequences(model, seqs, pad_token_id, batch_size)
    combined = combined_reward(raw, info)
    records, gold_records = [], []
    pos = 0
    for el in mine:
        flat = {}
        for j, s in enumerate(el.sequences):
            if s:
                flat[j] = pos
                pos += 1

        def score(j, aspect):
            return float(combined[flat[j]] if aspect == COMBINED else raw[flat[j], aspect])

        for c in el.comparisons:
            aspect = info["aspects"][c.aspect] if c.aspect != COMBINED else "combined"
            records.append((aspect, c.strength, c.tie, score(c.winner, c.aspect), score(c.loser, c.aspect)))
        if el.gold is not None:
            for a, b in itertools.combinations(flat, 2):
                if el.gold[a] != el.gold[b]:
                    gold_records.append(("combined", el.gold[a] > el.gold[b], score(a, COMBINED) > score(b, COMBINED),
                                         score(a, COMBINED) == score(b, COMBINED)))
                for k, name in enumerate(info["aspects"]):
                    if el.gold_aspects and name in el.gold_aspects[a] and \
                            el.gold_aspects[a][name] != el.gold_aspects[b][name]:
                        gold_records.append((name, el.gold_aspects[a][name] > el.gold_aspects[b][name],
                                             score(a, k) > score(b, k), score(a, k) == score(b, k)))
    if world > 1 and torch.distributed.is_initialized():
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (records, gold_records))
        records, gold_records = [r for p in parts for r in p[0]], [r for p in parts for r in p[1]]
    return _metrics(records, gold_records)


def _metrics(records, gold_records) -> tuple[dict, dict]:
    m: dict = {}
    untied = [r for r in records if not r[2]]
    if untied:
        m["accuracy"] = sum(w > l_ for *_, w, l_ in untied) / len(untied)
        m["mean_margin"] = sum(w - l_ for *_, w, l_ in untied) / len(untied)
        losses = [math.log1p(math.exp(-(w - l_))) if w - l_ > -30 else -(w - l_) for *_, w, l_ in untied]
        m["loss"] = sum(losses) / len(losses)
        m["pairs"] = len(untied)
        for key, pos in (("by_strength", 1), ("by_aspect", 0)):
            groups = defaultdict(list)
            for r in untied:
                groups[r[pos]].append(r[3] > r[4])
            m[key] = {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(groups.items())}
    ties = [r for r in records if r[2]]
    if ties:
        m["tie_pairs"] = len(ties)
        m["tie_mean_abs_difference"] = sum(abs(w - l_) for *_, w, l_ in ties) / len(ties)
    if gold_records:
        groups = defaultdict(list)
        for name, gold_first, pred_first, equal in gold_records:
            groups[name].append(gold_first == pred_first and not equal)
        m["gold_accuracy"] = sum(groups["combined"]) / len(groups["combined"]) if groups["combined"] else None
        m["gold_pairs"] = len(groups["combined"])
        m["gold_accuracy_by_aspect"] = {k: sum(v) / len(v) for k, v in sorted(groups.items()) if k != "combined"}
    if untied:
        m["calibration"] = calibration(torch.tensor([w - l_ for *_, w, l_ in untied]))
    dists = defaultdict(lambda: ([], []))
    for aspect, _, tie, w, l_ in untied:
        dists[aspect][0].append(w)
        dists[aspect][1].append(l_)
    return m, dict(dists)


# ----------------------------------------------------------------------------- diagnostics before PPO


def calibration(margins: torch.Tensor, bins: int = 10) -> dict:
    """Reliability of the Bradley-Terry probability P(winner) = sigmoid(r_w - r_l) against what annotators chose.

    margins: (P,) r_winner - r_loser of labelled pairs. Each pair is counted in both orders,
    (sigmoid(m), chose 1) and (sigmoid(-m), chose 0), so the diagram is symmetric about 0.5.
    Returns per bin of predicted probability [k/bins, (k+1)/bins) the mean prediction, the observed
    share chosen and the count, and the expected calibration error ECE = sum_b n_b/n |pred_b - obs_b|
    (Guo et al. 2017).
    """
    p = torch.sigmoid(margins.double())
    pred = torch.cat([p, 1 - p])
    obs = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    which = (pred * bins).long().clamp(max=bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            pm, om, n = pred[sel].mean().item(), obs[sel].mean().item(), int(sel.sum())
            out.append({"predicted": pm, "observed": om, "count": n})
            ece += n / len(pred) * abs(pm - om)
    return {"bins": out, "ece": ece}


GAP_EDGES = (0.0, 0.5, 1.0, 2.0, math.inf)


def accuracy_by_gold_gap(gold: torch.Tensor, scores: torch.Tensor, edges=GAP_EDGES, top: float = 0.1) -> dict:
    """How often the reward model orders two answers to the same prompt like gold, by gold gap.

    gold, scores: (P, M) gold reward and reward-model score of M answers to each of P prompts.
    Pairs with equal gold are left out; an equal score counts as wrong. ``top_decile``: only pairs
    of answers both in their prompt's top ``top`` share by gold (at least 2 answers): can the model
    still tell the best from the nearly best, where PPO ends up?
    """
    i, j = torch.triu_indices(gold.shape[1], gold.shape[1], offset=1)
    dg, ds = gold[:, i] - gold[:, j], scores[:, i] - scores[:, j]  # (P, pairs)
    keep = dg != 0
    right = (dg * ds > 0) & keep
    gap = dg.abs()
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = keep & (gap > lo) & (gap <= hi)
        n = int(sel.sum())
        out[f"({lo:g}, {hi:g}]"] = {"accuracy": right[sel].float().mean().item() if n else None, "pairs": n}
    k = max(2, math.ceil(top * gold.shape[1]))
    cut = gold.topk(k, dim=1).values[:, -1:]  # each prompt's k-th best gold
    both_top = (gold[:, i] >= cut) & (gold[:, j] >= cut) & keep
    n = int(both_top.sum())
    out["top_decile"] = {"accuracy": right[both_top].float().mean().item() if n else None, "pairs": n}
    return out


def score_range(scores: torch.Tensor) -> dict:
    """The reward-model scores in use: min, 1/10/50/90/99th percentiles, max, std (of a flat tensor)."""
    s = scores.flatten().double()
    q = torch.quantile(s, torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64))
    return {**{k: v.item() for k, v in zip(("min", "p1", "p10", "p50", "p90", "p99", "max"), q)}, "std": s.std().item()}


def best_of_n(gold: torch.Tensor, scores: torch.Tensor, ns: list[int]) -> list[dict]:
    """The best-of-N curve (Gao et al. 2022, "Scaling laws for reward model overoptimization"): for each N,
    the mean gold and score of the answer the reward model ranks best among N, and gold's own best (oracle).

    gold, scores: (P, M) for M samples per prompt. Each prompt's M samples are cut into M // N disjoint
    groups of N and every group contributes its best, so all samples are used. KL(best-of-N || policy) =
    log N - (N - 1) / N nats (Stiennon et al. 2020) is the x-axis Gao et al. plot against.
    """
    M = gold.shape[1]
    if max(ns) > M:
        raise ConfigError(f"best_of_n: N={max(ns)} is larger than the {M} samples per prompt available")
    out = []
    for n in ns:
        g = gold[:, : M // n * n].reshape(-1, n)
        s = scores[:, : M // n * n].reshape(-1, n)
        pick = s.argmax(-1, keepdim=True)
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n, "gold": g.gather(1, pick).mean().item(),
                    "score": s.gather(1, pick).mean().item(), "oracle_gold": g.max(-1).values.mean().item()})
    return out


@torch.no_grad()
def diagnose(rm_path: str, policy_path: str, prompt_files: list[str], num_prompts: int = 64, n: int = 64,
             response_length: int = 32, temperature: float = 1.0, max_length: int = 64, seed: int = 1234,
             chunk: int = 256) -> dict:
    """Sample ``n`` answers per held-out prompt from the policy (the SFT model), score them with the reward
    model (its combined normalised reward, what PPO optimises) and with gold, and return accuracy by gold
    gap (and in the top decile), the score range in use and the best-of-N curve for N = 1, 2, 4 ... n."""
    from transformers import AutoModelForCausalLM

    ns = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= n]
    if n not in ns:
        raise ConfigError(f"best_of_n: N must be a power of two up to 256, got {n}")
    tok = load_tokenizer(ModelConfig(name_or_path=policy_path), padding_side="left")
    data = DataConfig(train_files=prompt_files, max_length=max_length, truncation="truncate", packing=False)
    prompts, _ = load_prompts(prompt_files, tok, data, seed=seed, limit=num_prompts)
    policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    disable_dropout(policy)
    reward = build_reward([RewardSourceConfig(name_or_path=rm_path)])
    b_query, b_mask = left_pad([p.ids for p in prompts for _ in range(n)], tok.pad_token_id)
    torch.manual_seed(seed)
    b_response = torch.cat([sample(policy, b_query[i:i + chunk], b_mask[i:i + chunk], tok, response_length,
                                   temperature) for i in range(0, len(b_query), chunk)])
    b_response, b_response_mask, b_ended = truncate_after_eos(b_response, stop_token_ids(tok), tok.pad_token_id)
    texts = decode_responses(tok, b_response, b_response_mask, b_ended)
    values = [p.example.prompt for p in prompts for _ in range(n)]
    scores = reward(values, texts, b_ended.tolist()).float().reshape(len(prompts), n)
    gold = torch.tensor(gold_reward(values, texts), dtype=torch.float32).reshape(len(prompts), n)
    return {"prompts": len(prompts), "samples_per_prompt": n, "accuracy_by_gold_gap": accuracy_by_gold_gap(gold, scores),
            "score_range": score_range(scores), "best_of_n": best_of_n(gold, scores, ns),
            "policy_gold": {"mean": gold.mean().item(), "std": gold.std().item()}}


def write_diagnostics(rm_dir: str, diag: dict, eval_metrics: dict | None = None) -> str | None:
    """Add the diagnostics to the reward model's summary.json (key ``diagnostics``) and draw them next to it."""
    summary_path = os.path.join(rm_dir, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    cal = eval_metrics.get("calibration") if eval_metrics else (summary.get("eval") or {}).get("calibration")
    diag = {**diag, "calibration": cal}
    diag["png"] = plot_rm_diagnostics(diag, os.path.join(rm_dir, "rm_diagnostics.png"))
    summary["diagnostics"] = diag
    engine.write_json(summary_path, summary)
    return diag["png"]


# ----------------------------------------------------------------------------- alignkit rm-eval


def rm_eval(model_path: str, data: list[str], out_dir: str | None = None, batch_size: int = 32,
            max_length: int = 1024, settings: RewardSettings | None = None) -> dict:
    """Score any saved reward model on any preference file(s): the metrics of ``evaluate``.

    Labels on aspects the model has are judged on that aspect, labels without an aspect on the
    combined reward (unless the model has an "overall" aspect); other aspects are skipped.
    Annotators' labels are aggregated by majority vote; ties are reported apart.
    """
    model, tokenizer, info = load_reward_model(model_path)
    settings = settings or RewardSettings(aspects=list(info["aspects"]), aspect_weights=list(info["weights"]))
    examples = load_examples(data)
    present = {_aspect_name(lab) for ex in examples for lab in ex.labels} - set(info["aspects"]) - {OVERALL}
    settings.skip_aspects = sorted(present)
    elements, stats = build_elements(examples, settings, tokenizer, max_length, "truncate", evaluation=True)
    metrics, dists = evaluate(model, elements, info, reward_pad_id(model, tokenizer), batch_size=batch_size)
    metrics["data"] = stats
    metrics["skipped_aspects"] = settings.skip_aspects
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        metrics["distributions_png"] = plot_distributions(dists, os.path.join(out_dir, "reward_distributions.png"))
        engine.write_json(os.path.join(out_dir, "rm_eval.json"), metrics)
    return metrics


def run_rm_eval(args) -> int:
    m = rm_eval(args.model, args.data, args.out, args.batch_size, args.max_length)
    if args.policy:
        m["diagnostics"] = diagnose(args.model, args.policy, args.prompts or ["builtin:prompts:eval"],
                                    args.num_prompts, args.best_of_n)
        if args.out:
            write_diagnostics(args.out, m["diagnostics"], m)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"reward model {args.model} on {' '.join(args.data)}")
    for key in ("accuracy", "mean_margin", "loss", "pairs", "tie_pairs", "gold_accuracy", "gold_pairs"):
        if m.get(key) is not None:
            print(f"  {key:<16} {m[key]:.4f}" if isinstance(m[key], float) else f"  {key:<16} {m[key]}")
    for key in ("by_strength", "by_aspect"):
        for name, v in m.get(key, {}).items():
            print(f"  {key} {name:<22} accuracy {v['accuracy']:.4f}  ({v['pairs']} pairs)")
    for name, v in m.get("gold_accuracy_by_aspect", {}).items():
        print(f"  gold_accuracy {name:<18} {v:.4f}")
    if "calibration" in m:
        print(f"  calibration ECE  {m['calibration']['ece']:.4f}")
    d = m.get("diagnostics")
    if d:
        for name, v in d["accuracy_by_gold_gap"].items():
            acc = "n/a" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
            print(f"  gold gap {name:<14} accuracy {acc}  ({v['pairs']} pairs)")
        print("  score range " + "  ".join(f"{k} {v:.2f}" for k, v in d["score_range"].items()))
        for row in d["best_of_n"]:
            print(f"  best of {row['n']:<3} gold {row['gold']:.3f}  score {row['score']:.3f}  "
                  f"oracle gold {row['oracle_gold']:.3f}  KL {row['kl']:.2f}")
    return 0
