"""Reward-model evaluation: held-out accuracy (by strength, aspect and against gold) and ``alignkit rm-eval``.

    alignkit rm-eval --model runs/rm-tiny/final --data builtin:pairs:eval --json

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
from alignkit.plots import plot_distributions
from alignkit.rewards import combined_reward, load_reward_model, reward_pad_id, score_sequences
from alignkit.rm_data import COMBINED, OVERALL, RewardSettings, RMElement, _aspect_name, build_elements
from alignkit.schema import load_examples


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
    dists = defaultdict(lambda: ([], []))
    for aspect, _, tie, w, l_ in untied:
        dists[aspect][0].append(w)
        dists[aspect][1].append(l_)
    return m, dict(dists)


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
    return 0
