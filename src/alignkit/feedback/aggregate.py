"""Aggregate several annotators' labels into one label per item; score annotators on golden items.

    from alignkit.feedback.aggregate import aggregate_examples, annotator_accuracy
    clean = aggregate_examples(examples, method="dawid_skene", drop_below=0.6)
    alignkit data aggregate --method dawid_skene --drop-below 0.6 in.jsonl out.jsonl

An *item* is one question put to annotators: for pairwise labels a (row, aspect,
answer pair), for binary labels a (row, aspect, answer). Each annotator's vote on a
pairwise item is "first" (the lower answer index won), "second", or "tie"; on a
binary item "bad" or "good". Golden labels (``golden=True``, the known answer of a
control item) never vote: they score the annotators (``annotator_accuracy``), anchor
Dawid-Skene, and, where present, are the item's output label.

Methods:

* ``majority``: the most common non-tie vote; a draw gives a tie label.
* ``dawid_skene``: Dawid & Skene (1979), "Maximum likelihood estimation of observer
  error-rates using the EM algorithm". Each annotator has a confusion matrix
  P(vote | true class); EM alternates the class posteriors of every item and the
  matrices. Ties are an observed vote, never a true class. Golden items are clamped
  to their known class, which makes the estimate semi-supervised.
* ``bradley_terry``: per row, Bradley-Terry (1952) scores of the answers from all
  pairwise votes (and rankings); every compared pair gets one label with the
  higher-scored answer chosen and ``margin`` = the score difference.

Ratings, rankings and demonstrations are kept as they are (``ratings="mean"``
averages each answer's ratings per aspect instead).
Pure numpy: no pandas/sklearn. Crowd-Kit (optional extra ``alignkit[crowd]``) has
more models (GLAD, MACE); see ``to_crowdkit_frame``.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from alignkit.schema import DataError, Example, Label

METHODS = ("majority", "dawid_skene", "bradley_terry")
PAIRWISE_VOTES = ("first", "second", "tie")  # observed categories; true classes are the first two
BINARY_VOTES = ("bad", "good")


@dataclass
class Item:
    """One question several annotators answered."""

    row: int  # index of the example
    kind: str  # "pairwise" | "binary"
    aspect: str | None
    answers: tuple  # (i, j) with i < j for pairwise; (answer,) for binary
    votes: list = field(default_factory=list)  # [(annotator, vote index, Label)]
    gold: int | None = None  # true class from a golden label
    golden_label: Label | None = None

    @property
    def key(self):
        return (self.kind, self.aspect, self.answers)


def _vote_of(lab: Label) -> tuple[tuple, int]:
    if lab.kind == "pairwise":
        i, j = sorted((lab.chosen, lab.rejected))
        return (i, j), 2 if lab.tie else (0 if lab.chosen == i else 1)
    return (lab.answer,), 1 if lab.good else 0


def collect_items(examples: list[Example]) -> list[Item]:
    """Every pairwise and binary item of every row, with its votes and golden class."""
    items = []
    for r, ex in enumerate(examples):
        by_key: dict = {}
        for lab in ex.labels:
            if lab.kind not in ("pairwise", "binary"):
                continue
            answers, vote = _vote_of(lab)
            key = (lab.kind, lab.aspect, answers)
            item = by_key.get(key)
            if item is None:
                item = by_key[key] = Item(row=r, kind=lab.kind, aspect=lab.aspect, answers=answers)
            if lab.golden:
                if vote == 2:  # a golden tie says nothing about which answer is better
                    continue
                item.gold, item.golden_label = vote, lab
            else:
                item.votes.append((lab.annotator or "<anonymous>", vote, lab))
        items.extend(by_key.values())
    return items


# ----------------------------------------------------------------------------- annotator quality


def annotator_accuracy(examples: list[Example]) -> dict[str, dict]:
    """Each annotator's accuracy on golden items: {annotator: {"accuracy", "golden_items", "labels"}}.

    A vote matching the golden answer counts 1, a tie vote 0.5 (the expected score of
    breaking it at random), anything else 0. ``accuracy`` is None for an annotator who
    labelled no golden item.
    """
    stats: dict[str, list] = defaultdict(lambda: [0.0, 0, 0])  # score, golden votes, all votes
    for item in collect_items(examples):
        for ann, vote, _ in item.votes:
            s = stats[ann]
            s[2] += 1
            if item.gold is not None:
                s[0] += 0.5 if vote == 2 else float(vote == item.gold)
                s[1] += 1
    return {ann: {"accuracy": (s[0] / s[1]) if s[1] else None, "golden_items": s[1], "labels": s[2]}
            for ann, s in sorted(stats.items())}


def annotators_to_drop(examples: list[Example], drop_below: float, min_golden: int = 1) -> list[str]:
    """Annotators whose golden accuracy is under ``drop_below``.

    Raises DataError naming every annotator with fewer than ``min_golden`` golden
    items: their quality cannot be measured, so filtering by it would be a guess.
    """
    acc = annotator_accuracy(examples)
    unmeasured = [a for a, s in acc.items() if s["golden_items"] < min_golden]
    if unmeasured:
        raise DataError([f"annotator {a!r}: golden: labelled {acc[a]['golden_items']} golden item(s), fewer than "
                         f"min_golden={min_golden}, so golden-based filtering (drop_below={drop_below}) cannot score "
                         "them; add golden items for them or turn filtering off" for a in unmeasured])
    return [a for a, s in acc.items() if s["accuracy"] < drop_below]


# ----------------------------------------------------------------------------- models


def majority_vote(items: list[Item]) -> np.ndarray:
    """P(true class) per item from vote counts: (n_items, 2); a draw gives (0.5, 0.5).

    Tie votes count half for each side, which never changes the winner.
    """
    post = np.full((len(items), 2), 0.5)
    for n, item in enumerate(items):
        c = Counter(v for _, v, _ in item.votes)
        if c[0] > c[1]:
            post[n] = (1.0, 0.0)
        elif c[1] > c[0]:
            post[n] = (0.0, 1.0)
    return post


@dataclass
class DawidSkeneResult:
    posteriors: np.ndarray  # (n_items, 2) P(true class | votes)
    confusion: dict  # annotator -> (2, n_votes) P(vote | true class)
    priors: np.ndarray  # (2,)
    iterations: int

    def annotator_accuracy(self) -> dict[str, float]:
        """Estimated P(vote == true class), averaged over the class priors."""
        return {a: float(self.priors @ np.diag(m[:, :2])) for a, m in self.confusion.items()}


def dawid_skene(items: list[Item], n_votes: int, max_iter: int = 100, tol: float = 1e-6,
                smoothing: float = 0.01) -> DawidSkeneResult:
    """EM for the Dawid-Skene model with 2 true classes and ``n_votes`` observed categories.

    items: their ``votes`` (annotator, vote index) and optional ``gold`` (clamped).
    Initialised from the majority vote (tie votes split evenly). ``smoothing`` is a
    Dirichlet pseudo-count per confusion cell, so an annotator seen on few items
    does not get a 0/1 matrix.
    """
    annotators = sorted({a for it in items for a, _, _ in it.votes})
    a_index = {a: k for k, a in enumerate(annotators)}
    v_item = np.array([n for n, it in enumerate(items) for _ in it.votes], dtype=np.int64)
    v_ann = np.array([a_index[a] for it in items for a, _, _ in it.votes], dtype=np.int64)
    v_val = np.array([v for it in items for _, v, _ in it.votes], dtype=np.int64)
    gold_rows = np.array([n for n, it in enumerate(items) if it.gold is not None], dtype=np.int64)
    gold_vals = np.array([items[n].gold for n in gold_rows], dtype=np.int64)

    # initial posteriors: soft majority vote
    post = np.full((len(items), 2), 1e-3)
    for col in (0, 1):
        np.add.at(post[:, col], v_item, (v_val == col) + 0.5 * (v_val == 2))
    post /= post.sum(axis=1, keepdims=True)

    def clamp(p):
        if len(gold_rows):
            p[gold_rows] = 0.0
            p[gold_rows, gold_vals] = 1.0
        return p

    post = clamp(post)
    it = 0
    for it in range(1, max_iter + 1):
        # M-step: priors and confusion matrices from the current posteriors
        priors = post.mean(axis=0)
        counts = np.full((len(annotators), 2, n_votes), smoothing)
        for k in (0, 1):
            np.add.at(counts[:, k, :], (v_ann, v_val), post[v_item, k])
        confusion = counts / counts.sum(axis=2, keepdims=True)
        # E-step: log P(class) + sum over votes log P(vote | class)
        log_post = np.tile(np.log(priors + 1e-12), (len(items), 1))
        np.add.at(log_post, v_item, np.log(confusion[v_ann, :, v_val]))
        log_post -= log_post.max(axis=1, keepdims=True)
        new = np.exp(log_post)
        new = clamp(new / new.sum(axis=1, keepdims=True))
        delta = float(np.abs(new - post).max())
        post = new
        if delta < tol:
            break
    return DawidSkeneResult(posteriors=post, confusion={a: confusion[a_index[a]] for a in annotators},
                            priors=priors, iterations=it)


def bradley_terry_scores(n: int, wins, ties=(), l2: float = 0.01, max_iter: int = 100,
                         tol: float = 1e-9) -> np.ndarray:
    """Bradley-Terry (1952) strengths of ``n`` items from comparisons, centred at 0.

    wins: (winner, loser) index pairs; ties: (a, b) pairs, each counted as half a
    win for both sides. Maximises sum log sigmoid(s_w - s_l) - l2 * sum s^2 by
    Newton's method. With l2 = 0, one item beating another 3 times out of 4 gives a
    score difference of log 3.
    """
    pairs = [(w, l, 1.0) for w, l in wins] + [(a, b, 0.5) for a, b in ties] + [(b, a, 0.5) for a, b in ties]
    s = np.zeros(n)
    if not pairs or n < 2:
        return s
    w_idx = np.array([p[0] for p in pairs])
    l_idx = np.array([p[1] for p in pairs])
    weight = np.array([p[2] for p in pairs])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(s[w_idx] - s[l_idx])))  # P(winner beats loser)
        g_pair = weight * (1.0 - p)
        grad = -2.0 * l2 * s
        np.add.at(grad, w_idx, g_pair)
        np.subtract.at(grad, l_idx, g_pair)
        h_pair = weight * p * (1.0 - p)
        hess = np.zeros((n, n))  # negative Hessian: a weighted graph Laplacian + 2 l2 I
        np.add.at(hess, (w_idx, w_idx), h_pair)
        np.add.at(hess, (l_idx, l_idx), h_pair)
        np.subtract.at(hess, (w_idx, l_idx), h_pair)
        np.subtract.at(hess, (l_idx, w_idx), h_pair)
        hess += (2.0 * l2 + 1e-9) * np.eye(n)
        # the scores are defined up to a constant: solve on the space orthogonal to it
        step = np.linalg.lstsq(hess + np.ones((n, n)) / n, grad, rcond=None)[0]
        s += step
        s -= s.mean()
        if np.abs(step).max() < tol:
            break
    return s


# ----------------------------------------------------------------------------- examples in, examples out


def _winner_label(item: Item, cls: int | None, method: str) -> Label:
    """The aggregated label for an item: class 0/1, or None for a tie."""
    agreeing = [lab for _, v, lab in item.votes if v == cls]
    if item.kind == "binary":
        return Label(kind="binary", answer=item.answers[0], good=bool(cls), aspect=item.aspect, annotator=method)
    i, j = item.answers
    if cls is None:
        return Label(kind="pairwise", chosen=i, rejected=j, tie=True, aspect=item.aspect, annotator=method)
    strengths = Counter(lab.strength for lab in agreeing if lab.strength)
    margins = [lab.margin for lab in agreeing if lab.margin is not None]
    c, r = (i, j) if cls == 0 else (j, i)
    return Label(kind="pairwise", chosen=c, rejected=r, aspect=item.aspect, annotator=method,
                 strength=strengths.most_common(1)[0][0] if strengths else None,
                 margin=float(np.mean(margins)) if margins else None)


def _bradley_terry_row(ex: Example, labels: list[Label], method: str, l2: float) -> tuple[list[Label], dict]:
    """Per-answer BT scores of one row from its pairwise votes and rankings, per aspect."""
    out, scores = [], {}
    by_aspect = defaultdict(list)
    for lab in labels:
        if lab.kind in ("pairwise", "ranking") and not lab.golden:
            by_aspect[lab.aspect].append(lab)
    for aspect, labs in by_aspect.items():
        wins, ties, compared = [], [], set()
        for lab in labs:
            if lab.kind == "ranking":
                for a in range(len(lab.order)):
                    for b in range(a + 1, len(lab.order)):
                        wins.append((lab.order[a], lab.order[b]))
                        compared.add(tuple(sorted((lab.order[a], lab.order[b]))))
            elif lab.tie:
                ties.append((lab.chosen, lab.rejected))
                compared.add(tuple(sorted((lab.chosen, lab.rejected))))
            else:
                wins.append((lab.chosen, lab.rejected))
                compared.add(tuple(sorted((lab.chosen, lab.rejected))))
        s = bradley_terry_scores(len(ex.answers), wins, ties, l2=l2)
        scores[aspect or "overall"] = [round(float(x), 4) for x in s]
        for i, j in sorted(compared):
            d = float(s[i] - s[j])
            if abs(d) < 1e-6:
                out.append(Label(kind="pairwise", chosen=i, rejected=j, tie=True, aspect=aspect, annotator=method))
            else:
                c, r = (i, j) if d > 0 else (j, i)
                out.append(Label(kind="pairwise", chosen=c, rejected=r, margin=round(abs(d), 4), aspect=aspect,
                                 annotator=method))
    return out, scores


def _mean_ratings(labels: list[Label], method: str) -> list[Label]:
    groups = defaultdict(list)
    for lab in labels:
        if lab.kind == "rating" and not lab.golden:
            groups[(lab.answer, lab.aspect)].append(lab.value)
    return [Label(kind="rating", answer=a, aspect=asp, value=float(np.mean(v)), annotator=method)
            for (a, asp), v in groups.items()]


def aggregate_examples(examples: list[Example], method: str = "majority", drop_below: float | None = None,
                       min_golden: int = 1, ratings: str = "keep", bt_l2: float = 0.01,
                       max_iter: int = 100) -> list[Example]:
    """One label per item instead of one per annotator; the input is not modified.

    method: ``majority`` | ``dawid_skene`` | ``bradley_terry`` (see the module docstring).
    drop_below: drop the votes of annotators whose golden accuracy is under this
    (an annotator without ``min_golden`` golden items is a DataError).
    ratings: ``keep`` or ``mean`` (per answer and aspect).
    Items with a golden label output that label. An item left without votes (every
    annotator dropped, no golden label) gets no label. Each row's ``meta["aggregation"]``
    records, per item, the answers, the number of votes and the confidence
    (posterior of the chosen side; 1.0 for golden).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if ratings not in ("keep", "mean"):
        raise ValueError(f"ratings must be 'keep' or 'mean', got {ratings!r}")
    dropped = set(annotators_to_drop(examples, drop_below, min_golden)) if drop_below is not None else set()
    if dropped:
        examples = [_without(ex, dropped) for ex in examples]
    items = collect_items(examples)
    post = np.zeros((len(items), 2))
    if method == "majority":
        post = majority_vote(items)
    elif method == "dawid_skene":
        for kind, n_votes in (("pairwise", 3), ("binary", 2)):
            # one model per kind and aspect: an annotator can be careful on one aspect, not another
            for aspect in sorted({it.aspect or "" for it in items if it.kind == kind}):
                idx = [n for n, it in enumerate(items) if it.kind == kind and (it.aspect or "") == aspect]
                post[idx] = dawid_skene([items[n] for n in idx], n_votes, max_iter=max_iter).posteriors
    name = f"aggregate:{method}"
    by_row = defaultdict(list)
    for n, item in enumerate(items):
        by_row[item.row].append(n)

    out = []
    for r, ex in enumerate(examples):
        new = copy.deepcopy(ex)
        kept = [lab for lab in ex.labels if lab.kind not in ("pairwise", "binary")]
        if ratings == "mean":
            kept = [lab for lab in kept if lab.kind != "rating"] + _mean_ratings(ex.labels, name)
        labels, record = [], []
        if method == "bradley_terry":
            kept = [lab for lab in kept if lab.kind != "ranking" or lab.golden]  # votes became BT pairs
            bt_labels, scores = _bradley_terry_row(ex, ex.labels, name, bt_l2)
            golden = {it.key: it.golden_label for it in (items[n] for n in by_row[r]) if it.golden_label}
            for lab in bt_labels:
                key = ("pairwise", lab.aspect, tuple(sorted((lab.chosen, lab.rejected))))
                labels.append(golden.pop(key, lab))
            labels.extend(golden.values())
            labels.extend(items[n].golden_label or _winner_label(items[n], 1 if post[n, 1] > post[n, 0] else 0, name)
                          for n in by_row[r] if items[n].kind == "binary" and (items[n].votes or items[n].golden_label))
            new.meta = {**ex.meta, "aggregation": {"method": method, "scores": scores}}
        else:
            for n in by_row[r]:
                item = items[n]
                if item.golden_label is not None:
                    labels.append(item.golden_label)
                    record.append({"answers": list(item.answers), "votes": len(item.votes), "confidence": 1.0,
                                   "golden": True})
                    continue
                if not item.votes:
                    continue
                p0, p1 = post[n]
                cls = None if abs(p0 - p1) < 1e-9 else (0 if p0 > p1 else 1)
                if cls is None and item.kind == "binary":
                    cls = 1 if Counter(v for _, v, _ in item.votes).most_common(1)[0][0] == 1 else 0
                labels.append(_winner_label(item, cls, name))
                rec = {"answers": list(item.answers), "votes": len(item.votes),
                       "confidence": round(float(max(p0, p1)), 4)}
                if item.aspect is not None:
                    rec["aspect"] = item.aspect
                record.append(rec)
            new.meta = {**ex.meta, "aggregation": {"method": method, "items": record}}
        new.labels = kept + labels
        out.append(new)
    return out


def _without(ex: Example, dropped: set) -> Example:
    new = copy.copy(ex)
    new.labels = [lab for lab in ex.labels if lab.golden or lab.annotator not in dropped]
    return new


def to_crowdkit_frame(examples: list[Example]):
    """Pairwise votes as the ``worker, left, right, label`` DataFrame Crowd-Kit's BradleyTerry takes.

    Needs pandas (``pip install alignkit[crowd]``). Items are ``"<row id>/<answer>"``.
    """
    import pandas as pd

    rows = []
    for r, ex in enumerate(examples):
        rid = ex.id if ex.id is not None else str(r)
        for lab in ex.labels:
            if lab.kind == "pairwise" and not lab.golden and not lab.tie:
                rows.append({"worker": lab.annotator, "left": f"{rid}/{lab.chosen}", "right": f"{rid}/{lab.rejected}",
                             "label": f"{rid}/{lab.chosen}"})
    return pd.DataFrame(rows, columns=["worker", "left", "right", "label"])


def gold_accuracy(examples: list[Example], skip_golden: bool = True) -> dict[str, float]:
    """For rows with ``meta["gold"]`` (the built-in task): how often each pairwise label
    agrees with the gold reward. Ties count 0.5; pairs with equal gold are skipped.
    Rows that carry a golden label are skipped when ``skip_golden`` (they are not a test of the vote).
    """
    score, n = 0.0, 0
    for ex in examples:
        gold = ex.meta.get("gold")
        if gold is None or (skip_golden and any(lab.golden for lab in ex.labels)):
            continue
        for lab in ex.labels:
            if lab.kind != "pairwise" or lab.golden or gold[lab.chosen] == gold[lab.rejected]:
                continue
            score += 0.5 if lab.tie else float(gold[lab.chosen] > gold[lab.rejected])
            n += 1
    return {"accuracy": score / n if n else math.nan, "pairs": n}
