"""Dataset statistics, prompt (near-)duplicates and leakage-free splits.

    from alignkit.feedback.inspect import inspect_examples, split_by_prompt
    report = inspect_examples(train, eval_examples=held_out)
    train, held_out = split_by_prompt(examples, eval_fraction=0.1, seed=0)
    alignkit data inspect train.jsonl --eval eval.jsonl [--json]

Near-duplicates: prompts are lower-cased and stripped of punctuation, cut into word
3-grams (single words for prompts under three words) and compared by Jaccard
similarity; candidate pairs come from MinHash with locality-sensitive hashing
(Broder 1997; 16 bands of 4 hashes find a pair at Jaccard 0.8 with probability
0.9998), and every reported pair is checked exactly.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter, defaultdict

import numpy as np

from alignkit.feedback.aggregate import annotator_accuracy
from alignkit.feedback.agreement import agreement_report
from alignkit.feedback.exporters import prompt_text
from alignkit.schema import LABEL_KINDS, Example

_NON_WORD = re.compile(r"[^\w]+")


def normalize_text(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def shingles(text: str, n: int = 3) -> set:
    words = normalize_text(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_PRIME = (1 << 31) - 1  # a, b, x < 2^31 keep a * x + b inside uint64


def near_duplicate_pairs(texts: list[str], threshold: float = 0.8, bands: int = 16, rows: int = 4,
                         seed: int = 0) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with i < j for every pair of ``texts`` at Jaccard >= threshold (found by MinHash-LSH).

    Pass distinct texts: identical ones all share every bucket.
    """
    sets = [shingles(t) for t in texts]
    rng = np.random.default_rng(seed)
    k = bands * rows
    a = rng.integers(1, _PRIME, size=(k, 1), dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=(k, 1), dtype=np.uint64)
    buckets = defaultdict(list)
    for idx, s in enumerate(sets):
        if not s:
            continue
        x = np.array([zlib.crc32(sh.encode()) % _PRIME for sh in s], dtype=np.uint64)[None, :]
        sig = ((a * x + b) % _PRIME).min(axis=1)  # h_m(x) = (a_m x + b_m) mod p, min over the shingles
        for band in range(bands):
            buckets[(band, sig[band * rows:(band + 1) * rows].tobytes())].append(idx)
    candidates = set()
    for members in buckets.values():
        for p in range(len(members)):
            for q in range(p + 1, len(members)):
                candidates.add((members[p], members[q]))
    out = []
    for i, j in sorted(candidates):
        sim = jaccard(sets[i], sets[j])
        if sim >= threshold:
            out.append((i, j, round(sim, 4)))
    return out


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    return {"min": int(v.min()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "max": int(v.max()), "mean": round(float(v.mean()), 2)}


def prompt_duplicates(examples: list[Example], threshold: float = 0.8, max_listed: int = 10) -> dict:
    texts = [prompt_text(ex.prompt) for ex in examples]
    exact = Counter(texts)
    first = {}
    for ex, t in zip(examples, texts):
        first.setdefault(t, ex.source)
    distinct = list(first)
    near = near_duplicate_pairs(distinct, threshold)
    return {"distinct_prompts": len(exact), "rows_with_repeated_prompt": sum(c for c in exact.values() if c > 1),
            "near_duplicate_pairs": len(near),
            "examples": [{"a": first[distinct[i]], "b": first[distinct[j]], "jaccard": s} for i, j, s in near[:max_listed]]}


def cross_split_overlap(train: list[Example], held_out: list[Example], threshold: float = 0.8,
                        max_listed: int = 10) -> dict:
    """Eval prompts that also appear in train: exactly, or as a near-duplicate."""
    train_first, eval_first = {}, {}
    for ex in train:
        train_first.setdefault(prompt_text(ex.prompt), ex.source)
    for ex in held_out:
        eval_first.setdefault(prompt_text(ex.prompt), ex.source)
    eval_texts = [prompt_text(ex.prompt) for ex in held_out]
    exact = [t for t in eval_first if t in train_first]
    train_only = [t for t in train_first if t not in eval_first]
    eval_distinct = list(eval_first)
    n = len(train_only)
    pairs = near_duplicate_pairs(train_only + eval_distinct, threshold)
    near = sorted({(j - n, i, s) for i, j, s in pairs if i < n <= j})
    near_texts = {eval_distinct[j] for j, _, _ in near}
    return {"eval_prompts": len(eval_texts),
            "exact_in_train": sum(t in train_first for t in eval_texts),
            "near_duplicate_in_train": sum(t in near_texts for t in eval_texts),
            "examples": [{"eval": eval_first[t], "train": train_first[t], "jaccard": 1.0} for t in exact[:max_listed]]
            + [{"eval": eval_first[eval_distinct[j]], "train": train_first[train_only[i]], "jaccard": s}
               for j, i, s in near[:max_listed]]}


def inspect_examples(examples: list[Example], eval_examples: list[Example] | None = None,
                     near_threshold: float = 0.8) -> dict:
    """Everything `alignkit data inspect` prints, as a dict."""
    counts = Counter()
    aspects = Counter()
    golden = Counter()
    for ex in examples:
        if not ex.labels:
            counts["prompt_only"] += 1
        for lab in ex.labels:
            counts[lab.kind] += 1
            aspects[lab.aspect or "overall"] += 1
            if lab.golden:
                golden[lab.kind] += 1
    ties = sum(lab.tie for ex in examples for lab in ex.labels if lab.kind == "pairwise")
    report = {
        "rows": len(examples),
        "labels": {k: counts[k] for k in (*LABEL_KINDS, "prompt_only") if counts[k]},
        "pairwise_ties": ties,
        "aspects": dict(aspects),
        "golden_labels": dict(golden),
        "answers_per_row": _quantiles([len(ex.answers) for ex in examples]),
        "prompt_words": _quantiles([len(prompt_text(ex.prompt).split()) for ex in examples]),
        "answer_words": _quantiles([len(a.split()) for ex in examples for a in ex.answers]),
        "conversational_prompts": sum(isinstance(ex.prompt, list) for ex in examples),
        "annotators": annotator_accuracy(examples),
        "agreement": agreement_report(examples),
        "duplicates": prompt_duplicates(examples, near_threshold),
    }
    if eval_examples is not None:
        report["eval_rows"] = len(eval_examples)
        report["train_eval_overlap"] = cross_split_overlap(examples, eval_examples, near_threshold)
    return report


def split_by_prompt(examples: list[Example], eval_fraction: float = 0.1, seed: int = 0,
                    near_threshold: float | None = 0.8) -> tuple[list[Example], list[Example]]:
    """Train/eval split where all rows of one prompt land on the same side.

    Rows are grouped by normalised prompt text and, unless ``near_threshold`` is None,
    by near-duplicate prompts too (connected components), so no eval prompt has a
    copy in train. Groups are shuffled with ``seed`` and taken into eval until it
    holds ``eval_fraction`` of the rows. Row order is kept within each side.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    texts = [normalize_text(prompt_text(ex.prompt)) for ex in examples]
    parent = list(range(len(examples)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    for i, t in enumerate(texts):
        if t in first:
            parent[find(i)] = find(first[t])
        else:
            first[t] = i
    if near_threshold is not None:
        distinct = list(first)
        for i, j, _ in near_duplicate_pairs(distinct, near_threshold):
            parent[find(first[distinct[i]])] = find(first[distinct[j]])
    groups = defaultdict(list)
    for i in range(len(examples)):
        groups[find(i)].append(i)
    keys = sorted(groups, key=lambda g: texts[g])  # independent of input order
    random.Random(seed).shuffle(keys)
    target = eval_fraction * len(examples)
    eval_idx = set()
    for g in keys:
        if len(eval_idx) >= target:
            break
        eval_idx.update(groups[g])
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    held_out = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, held_out
