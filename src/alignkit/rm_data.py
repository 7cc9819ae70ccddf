"""Reward-model data: schema rows -> validated, aggregated comparisons -> token batches.

One training element is one prompt with its K answers and every comparison made on
them (winner, loser, margin, aspect, tie): a pair is K = 2, a ranking of K answers
gives its C(K, 2) pairs, ratings become pairs within a prompt, aspect and annotator
(Ouyang et al. 2022, sec. 3.5). ``collate_elements`` pads a micro-batch's answers;
``pack_elements`` packs them, each element's prompt once with its answers branching off
it (a tree mask). Scores are read at ``alignkit.rewards.read_position`` in both.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, NamedTuple

import torch

from alignkit.config import ConfigError
from alignkit.losses import MARGIN_TABLES, ranking_to_pairs
from alignkit.rewards import encode_for_reward, read_position
from alignkit.schema import DataError, Example, Label, demonstrations, load_examples, prepare_splits
from alignkit.tokenization import encode_answer, encode_prompt, fit_length, packed_attention_mask, right_pad

if TYPE_CHECKING:
    from alignkit.rm import RMConfig

OVERALL = "overall"  # the aspect of a label that names none
COMBINED = -1  # aspect index meaning "the weighted combination" (evaluation only)


@dataclass
class RewardSettings:
    # One score per named aspect; a label without an aspect counts as "overall".
    aspects: List[str] = field(default_factory=lambda: [OVERALL])
    # Weights of the combined reward ("the reward" PPO optimises); empty = 1 for every aspect.
    aspect_weights: List[float] = field(default_factory=list)
    # Aspects present in the data but not trained here (e.g. a separate single-aspect model).
    skip_aspects: List[str] = field(default_factory=list)
    # Margin inside the BT loss: none, llama2_small / llama2_large (from the labelled strength), or label (its number).
    margin: str = "none"
    # Pairs labelled as ties: drop them, or train the two scores toward equal (equal).
    ties: str = "drop"
    # A ranking of K answers: all C(K,2) pairs as one element (pairs), or the listwise plackett_luce loss.
    rankings: str = "pairs"
    # Several annotators on one item: aggregate their labels first, or train on each annotator's pairs (each).
    annotators: str = "aggregate"
    # How labels are aggregated (alignkit.feedback.aggregate): majority, dawid_skene, or bradley_terry
    # (per-row BT scores; the score difference becomes each pair's margin, used with margin: label).
    aggregation: str = "majority"
    # Declared [min, max] of rating values; a rating outside is an error.
    rating_scale: List[float] = field(default_factory=lambda: [1.0, 5.0])
    # Optional centring term coef * mean(r^2) keeping raw scores near 0 (TRL's center_rewards_coefficient).
    center_coef: float = 0.0
    # Files whose demonstrations define mean 0 / std 1 of the normalised reward (InstructGPT's bias);
    # empty = the demonstrations in the training data, else all its answers.
    normalize_on: List[str] = field(default_factory=list)
    # At most this many answers are scored for the normalisation statistics.
    normalize_max_examples: int = 1000
    # Train this many reward models, seeds train.seed, train.seed + 1, ...: output_dir/final and
    # output_dir/member_<i>/final. A pipeline's @rm reward then reads them as one conservative reward
    # (reward.sources.members, combine; Coste et al. 2023); elsewhere list the folders in members.
    ensemble: int = 1

    def __post_init__(self):
        choices = {"margin": ("none", "label", *MARGIN_TABLES), "ties": ("drop", "equal"),
                   "rankings": ("pairs", "plackett_luce"), "annotators": ("aggregate", "each"),
                   "aggregation": ("majority", "dawid_skene", "bradley_terry")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"rm.{key}: must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.ensemble < 1:
            raise ConfigError(f"rm.ensemble: the number of reward models must be >= 1, got {self.ensemble}")
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise ConfigError(f"rm.aspects: need at least one aspect and no duplicates, got {list(self.aspects)}")
        if self.aspect_weights and len(self.aspect_weights) != len(self.aspects):
            raise ConfigError(f"rm.aspect_weights: {len(self.aspect_weights)} weight(s) for "
                              f"{len(self.aspects)} aspect(s) {list(self.aspects)}")
        if len(self.rating_scale) != 2 or self.rating_scale[0] >= self.rating_scale[1]:
            raise ConfigError(f"rm.rating_scale: expected [min, max] with min < max, got {list(self.rating_scale)}")
        if set(self.skip_aspects) & set(self.aspects):
            raise ConfigError("rm.skip_aspects: an aspect cannot be both trained and skipped")

    @property
    def weights(self) -> list[float]:
        return list(self.aspect_weights) if self.aspect_weights else [1.0] * len(self.aspects)


# ----------------------------------------------------------------------------- data -> elements


class Comparison(NamedTuple):
    winner: int  # answer index within the element (for a tie: the first answer)
    loser: int
    margin: float
    aspect: int  # index into rm.aspects; COMBINED in evaluation for undeclared "overall"
    tie: bool
    strength: str  # for accuracy by strength; "none" if unlabelled


@dataclass
class RMElement:
    """One prompt, its K answers as prompt + answer token ids, and every comparison made on them."""

    sequences: list[list[int]]  # [] for an answer dropped by data.truncation=drop
    comparisons: list[Comparison]
    rankings: list[tuple[list[int], int]]  # (order best first, aspect) for Plackett-Luce
    source: str
    gold: list[float] | None = None
    gold_aspects: list[dict] | None = None


def _aspect_name(lab: Label) -> str:
    return lab.aspect if lab.aspect is not None else OVERALL


def validate_labels(examples: list[Example], settings: RewardSettings, evaluation: bool = False) -> None:
    """Raise one DataError naming every bad label: undeclared aspect, unknown strength, rating off scale,
    or two compared answers with identical text. (Schema loading already rejects broken rankings.)"""
    problems = []
    lo, hi = settings.rating_scale
    table = MARGIN_TABLES.get(settings.margin)
    for ex in examples:
        for i, lab in enumerate(ex.labels):
            if lab.kind not in ("pairwise", "ranking", "rating"):
                continue
            f = f"labels[{i}]"
            name = _aspect_name(lab)
            if not evaluation and name not in settings.aspects and name not in settings.skip_aspects:
                what = "label has no aspect, so it counts as 'overall', which" if lab.aspect is None else f"'{name}'"
                problems.append(f"{ex.source}: {f}.aspect: {what} is not declared in rm.aspects "
                                f"{list(settings.aspects)} (declare it, or list it in rm.skip_aspects)")
            if lab.kind == "pairwise":
                if table is not None and lab.strength is not None and not lab.tie and lab.strength not in table:
                    problems.append(f"{ex.source}: {f}.strength: {lab.strength!r} is not in the {settings.margin} "
                                    f"margin table {sorted(table)}")
                if ex.answers[lab.chosen] == ex.answers[lab.rejected]:
                    problems.append(f"{ex.source}: {f}.rejected: chosen (answers[{lab.chosen}]) and rejected "
                                    f"(answers[{lab.rejected}]) are identical text")
            elif lab.kind == "ranking":
                seen = {}
                for j in lab.order:
                    if ex.answers[j] in seen:
                        problems.append(f"{ex.source}: {f}.order: answers[{seen[ex.answers[j]]}] and answers[{j}] "
                                        "are identical text, so they cannot be ranked against each other")
                    seen.setdefault(ex.answers[j], j)
            elif lab.kind == "rating" and not lo <= lab.value <= hi:
                problems.append(f"{ex.source}: {f}.value: rating {lab.value:g} is outside rm.rating_scale "
                                f"[{lo:g}, {hi:g}]")
    if problems:
        raise DataError(problems)


def _votes(ex: Example, labels: list[Label]) -> list[tuple[str, Label]]:
    """Every label as one or more (annotator, pairwise label): rankings give C(K,2) pairs and the ratings of
    one annotator on one aspect give a pair (or a tie) for every two answers."""
    out = []
    ratings = defaultdict(dict)
    for lab in labels:
        who = "golden" if lab.golden else str(lab.annotator)
        if lab.kind == "pairwise":
            out.append((who, lab))
        elif lab.kind == "ranking":
            out += [(who, Label(kind="pairwise", chosen=w, rejected=l_, aspect=lab.aspect, annotator=lab.annotator,
                                golden=lab.golden)) for w, l_ in ranking_to_pairs(lab.order)]
        elif lab.kind == "rating":
            ratings[(who, lab.aspect, lab.golden)][lab.answer] = lab.value
    for (who, aspect, golden), values in ratings.items():
        for a, b in itertools.combinations(sorted(values), 2):
            w, l_ = (a, b) if values[a] >= values[b] else (b, a)
            out.append((who, Label(kind="pairwise", chosen=w, rejected=l_, tie=values[a] == values[b],
                                   aspect=aspect, annotator=who, golden=golden)))
    return out


def _as_pairwise_votes(ex: Example) -> Example:
    """Ratings (per annotator and aspect) and rankings made by several annotators become pairwise votes,
    so that aggregation compares like with like; one annotator's ranking stays a ranking."""
    rankers = defaultdict(set)
    for lab in ex.labels:
        if lab.kind == "ranking":
            rankers[lab.aspect].add("golden" if lab.golden else str(lab.annotator))
    convert = [lab for lab in ex.labels
               if lab.kind == "rating" or (lab.kind == "ranking" and len(rankers[lab.aspect]) > 1)]
    if not convert:
        return ex
    keep = [lab for lab in ex.labels if not any(lab is c for c in convert)]
    return Example(prompt=ex.prompt, answers=ex.answers, labels=keep + [lab for _, lab in _votes(ex, convert)],
                   id=ex.id, meta=ex.meta, source=ex.source)


def aggregate(examples: list[Example], method: str) -> list[Example]:
    """One judgement per (prompt, aspect, answer pair) from several annotators' labels
    (``alignkit.feedback.aggregate``: majority vote or Dawid-Skene; golden labels win)."""
    from alignkit.feedback.aggregate import aggregate_examples

    return aggregate_examples([_as_pairwise_votes(ex) for ex in examples], method)


def _aspect_index(name: str, settings: RewardSettings, evaluation: bool) -> int | None:
    if name in settings.aspects:
        return settings.aspects.index(name)
    if evaluation and name == OVERALL:
        return COMBINED  # an overall label judges the combined reward of a multi-aspect model
    return None  # skipped aspect (validate_labels rejects undeclared ones in training)


def comparisons_of(ex: Example, settings: RewardSettings, evaluation: bool = False):
    """(comparisons, rankings) of one example under the settings' margin, tie and ranking policies."""
    table = MARGIN_TABLES.get(settings.margin)
    comps, rankings = [], []
    for who, lab in _votes(ex, [lab for lab in ex.labels if lab.kind in ("pairwise", "rating")]):
        aspect = _aspect_index(_aspect_name(lab), settings, evaluation)
        if aspect is None or (lab.tie and settings.ties == "drop" and not evaluation):
            continue
        margin = 0.0
        if not lab.tie and table is not None and lab.strength is not None:
            margin = table[lab.strength]
        elif not lab.tie and settings.margin == "label" and lab.margin is not None:
            margin = lab.margin
        comps.append(Comparison(lab.chosen, lab.rejected, margin, aspect, lab.tie, lab.strength or "none"))
    for lab in ex.labels:
        if lab.kind != "ranking":
            continue
        aspect = _aspect_index(_aspect_name(lab), settings, evaluation)
        if aspect is None:
            continue
        if settings.rankings == "plackett_luce" and not evaluation:
            rankings.append((list(lab.order), aspect))
        else:
            comps += [Comparison(w, l_, 0.0, aspect, False, "none") for w, l_ in ranking_to_pairs(lab.order)]
    return comps, rankings


def build_elements(examples: list[Example], settings: RewardSettings, tokenizer, max_length: int, truncation: str,
                   evaluation: bool = False) -> tuple[list[RMElement], dict]:
    """Validate, aggregate and tokenize; every problem in the data is reported at once, before training."""
    validate_labels(examples, settings, evaluation)
    if settings.annotators == "aggregate":
        examples = aggregate(examples, settings.aggregation)
    problems, elements = [], []
    stats = Counter()
    prompt_cache: dict[str, list[int]] = {}
    for ex in examples:
        comps, rankings = comparisons_of(ex, settings, evaluation)
        gold = ex.meta.get("gold") if isinstance(ex.meta.get("gold"), list) else None
        if not comps and not rankings and not (evaluation and gold):
            continue
        key = repr(ex.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompt(tokenizer, ex.messages)
        prompt_ids, sequences, dropped = prompt_cache[key], [], set()
        used = {j for c in comps for j in (c.winner, c.loser)} | {j for order, _ in rankings for j in order}
        for j, text in enumerate(ex.answers):
            if j not in used and not evaluation:  # an answer nobody compared teaches nothing: not scored
                sequences.append([])
                continue
            answer_ids = encode_answer(tokenizer, text)
            n = len(prompt_ids) + len(answer_ids)
            if n > max_length and truncation == "error":
                problems.append(f"{ex.source}: answers[{j}]: prompt + answer is {n} tokens, more than "
                                f"data.max_length={max_length}; raise max_length or set data.truncation=truncate|drop")
                continue
            fitted = fit_length(prompt_ids, answer_ids, max_length, truncation, ex.source, [])
            if fitted is None:
                dropped.add(j)
            sequences.append([] if fitted is None else fitted[0] + fitted[1])
        if dropped:
            stats["answers_dropped"] += len(dropped)
            comps = [c for c in comps if c.winner not in dropped and c.loser not in dropped]
            rankings = [(o, a) for o, a in rankings if not dropped & set(o)]
            if not comps and not rankings:
                continue
        stats["elements"] += 1
        stats["answers"] += sum(1 for seq in sequences if seq)
        stats["pairs"] += sum(not c.tie for c in comps)
        stats["tie_pairs"] += sum(c.tie for c in comps)
        stats["rankings"] += len(rankings)
        elements.append(RMElement(sequences, comps, rankings, ex.source, gold,
                                  ex.meta.get("gold_aspects") if gold else None))
    if problems:
        raise DataError(problems)
    return elements, dict(stats)


# ----------------------------------------------------------------------------- batches


def _comparison_tensors(elements: list[RMElement], num_aspects: int) -> tuple[list[list[int]], dict]:
    """The answers of every element, flat (non-empty sequences in order), and the comparison tensors
    indexing into the flat (answers x aspects) reward vector; ``group`` is the element."""
    seqs, winners, losers, group, margin, tie, rank_rows = [], [], [], [], [], [], []
    A = num_aspects
    for g, el in enumerate(elements):
        flat = {}
        for j, s in enumerate(el.sequences):
            if s:
                flat[j] = len(seqs)
                seqs.append(s)
        for c in el.comparisons:
            winners.append(flat[c.winner] * A + c.aspect)
            losers.append(flat[c.loser] * A + c.aspect)
            group.append(g)
            margin.append(c.margin)
            tie.append(c.tie)
        rank_rows += [[flat[j] * A + a for j in order] for order, a in el.rankings]
    k = max((len(r) for r in rank_rows), default=0)
    rankings = torch.zeros((len(rank_rows), k), dtype=torch.long)
    ranking_mask = torch.zeros((len(rank_rows), k), dtype=torch.bool)
    for i, r in enumerate(rank_rows):
        rankings[i, :len(r)] = torch.tensor(r)
        ranking_mask[i, :len(r)] = True
    return seqs, {"winners": torch.tensor(winners, dtype=torch.long), "losers": torch.tensor(losers, dtype=torch.long),
                  "group": torch.tensor(group, dtype=torch.long), "margin": torch.tensor(margin, dtype=torch.float),
                  "tie": torch.tensor(tie, dtype=torch.bool), "rankings": rankings, "ranking_mask": ranking_mask,
                  "num_groups": torch.tensor(len(set(group)) + len(rank_rows))}


def collate_elements(elements: list[RMElement], pad_token_id: int, num_aspects: int) -> dict:
    """Answers of every element, flat and right-padded, with comparisons indexing into the flat
    (answers x aspects) reward vector; ``group`` is the element, so each prompt's pairs average first."""
    seqs, batch = _comparison_tensors(elements, num_aspects)
    input_ids, attention_mask = right_pad(seqs, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **batch}


def _units(seqs: list[list[int]], row_length: int, share_prefix: bool) -> list[tuple[int, list[int]]]:
    """One element's answers (indices into ``seqs``) as units (shared prefix length, answer indices), each
    at most ``row_length`` tokens: the prompt tokens common to the answers once, then every answer's rest."""
    p = 0
    if share_prefix and len(seqs) > 1:
        p = len(os.path.commonprefix(seqs))
        p = min(p, min(len(s) for s in seqs) - 1)  # every answer keeps at least its last token
    units, current, size = [], [], p
    for i, s in enumerate(seqs):
        if current and size + len(s) - p > row_length:
            units.append((p, current))
            current, size = [], p
        current.append(i)
        size += len(s) - p
    units.append((p, current))
    return units


# Packed rows are this long unless a unit (a prompt with its answers) is longer, and at most data.max_length.
# Attention over a row costs its length squared whatever the mask, so on CPU short rows win: on builtin:small
# a training step with rows of 64 took ~0.8x the time of rows of 128 holding the same tokens.
PACK_ROW_LENGTH = 64


def pack_elements(elements: list[RMElement], pad_token_id: int, num_aspects: int, row_length: int,
                  share_prefix: bool = True, min_row_length: int = PACK_ROW_LENGTH,
                  attn_implementation: str | None = "sdpa") -> dict:
    """The answers of a micro-batch packed into rows of at most ``row_length`` tokens, no padding compute.

    Each element's prompt tokens (the common prefix of its answers) appear once and every answer's
    remaining tokens follow, attending to that prefix and to themselves only (a tree mask; several
    elements share a row, isolated by the mask). Positions restart per element and an answer's tokens
    continue from the prefix, so every token sees exactly what it sees in its own unpadded sequence.
    Rows hold ``max(min_row_length, longest unit)`` tokens, at most ``row_length`` (a unit is an element's
    prompt with as many of its answers as fit in ``row_length``). Returns the comparison tensors of
    ``collate_elements`` plus ``input_ids``/``position_ids`` (R, L), a
    (R, 1, L, L) bool ``attention_mask`` and ``read_index`` (N,): where each answer's score is read in the
    flattened (R * L) tokens, in the flat answer order of ``collate_elements``, and ``token_index``
    (N, longest answer): the flat position of each of an answer's tokens, -1 after its end.
    """
    seqs, batch = _comparison_tensors(elements, num_aspects)
    units = []  # (tokens, first flat answer, shared prefix length, answer indices)
    start = 0
    for el in elements:
        mine = [s for s in el.sequences if s]
        for p, members in _units(mine, row_length, share_prefix):
            units.append((p + sum(len(mine[i]) - p for i in members), start, p, members))
        start += len(mine)
    capacity = min(row_length, max(min_row_length, max(u[0] for u in units)))
    # Best-fit decreasing: each unit into the fullest row that still has room.
    rows, space = [], []
    for u in sorted(units, key=lambda u: -u[0]):
        best = min((r for r in range(len(rows)) if space[r] >= u[0]), key=lambda r: space[r], default=None)
        if best is None:
            rows.append([u])
            space.append(max(capacity, u[0]) - u[0])
        else:
            rows[best].append(u)
            space[best] -= u[0]
    length = max(sum(u[0] for u in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, length), pad_token_id if pad_token_id is not None else 0, dtype=torch.long)
    position_ids = torch.zeros((R, length), dtype=torch.long)
    unit_of = torch.full((R, length), -1, dtype=torch.long)  # which unit a token belongs to (-1: padding)
    branch = torch.full((R, length), -1, dtype=torch.long)  # which answer (-1: the shared prefix)
    read_index = torch.zeros(len(seqs), dtype=torch.long)
    # Where every token of every answer sits in the flattened rows (-1 after its end): the DPO stage reads
    # next-token log-probs there (the prefix's last token predicts each answer's first token of its own).
    token_index = torch.full((len(seqs), max(len(s) for s in seqs)), -1, dtype=torch.long)
    u_id = 0
    for r, row in enumerate(rows):
        t = 0
        for _, first, p, members in row:
            prefix = seqs[first + members[0]][:p]
            input_ids[r, t:t + p] = torch.tensor(prefix, dtype=torch.long)
            position_ids[r, t:t + p] = torch.arange(p)
            unit_of[r, t:t + p] = u_id
            prefix_at, t = t, t + p
            for i in members:
                s = seqs[first + i]
                n = len(s) - p
                input_ids[r, t:t + n] = torch.tensor(s[p:], dtype=torch.long)
                position_ids[r, t:t + n] = torch.arange(p, len(s))
                unit_of[r, t:t + n] = u_id
                branch[r, t:t + n] = i
                k = read_position(s, pad_token_id)
                read_index[first + i] = r * length + (prefix_at + k if k < p else t + k - p)
                token_index[first + i, :p] = r * length + prefix_at + torch.arange(p)
                token_index[first + i, p:len(s)] = r * length + t + torch.arange(n)
                t += n
            u_id += 1
    same = (unit_of[:, :, None] == unit_of[:, None, :]) & (unit_of[:, None, :] >= 0)
    tree = (branch[:, None, :] < 0) | (branch[:, :, None] == branch[:, None, :])
    mask = same & tree & torch.tril(torch.ones(length, length, dtype=torch.bool))
    mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no all-masked softmax row
    return {"input_ids": input_ids, "attention_mask": packed_attention_mask(mask[:, None], attn_implementation),
            "position_ids": position_ids, "read_index": read_index, "token_index": token_index, **batch}



def prepare_rm_data(cfg: RMConfig, tokenizer):
    """Load, validate, aggregate and tokenize train and eval data; all problems raised together.
    Returns (train elements, eval elements, stats, the training examples kept for normalisation)."""
    kept = {}

    def build(examples, split, files):
        kept[split] = examples
        elements, stats = build_elements(examples, cfg.rm, tokenizer, cfg.data.max_length, cfg.data.truncation,
                                         evaluation=split == "eval")
        if split == "train" and not elements:
            raise DataError([f"{', '.join(files)}: labels: no comparisons found (the reward model needs "
                             "pairwise, ranking or rating labels, or {prompt, chosen, rejected} rows)"])
        return elements, stats

    def validate(examples, split):  # a wrong label is an error, not a row to skip
        validate_labels(examples, cfg.rm, evaluation=split == "eval")

    train, evaluation, stats = prepare_splits(cfg.data, cfg.train.seed, "rm", build, validate)
    return train, evaluation, stats, kept.get("train", [])


def reference_sequences(cfg: RMConfig, tokenizer, train_examples: list[Example]) -> tuple[list[list[int]], str]:
    """Token ids of the answers that define mean 0 / std 1: rm.normalize_on's demonstrations,
    else the training data's demonstrations, else every training answer."""
    if cfg.rm.normalize_on:
        examples, what = load_examples(cfg.rm.normalize_on, seed=cfg.train.seed), ", ".join(cfg.rm.normalize_on)
    else:
        examples, what = train_examples, "training data"
    pairs = demonstrations(examples)
    if not pairs:
        pairs = [(ex, a) for ex in examples for a in ex.answers]
        what += " (all answers: no demonstrations)"
    else:
        what += " (demonstrations)"
    pairs = pairs[:cfg.rm.normalize_max_examples]
    return [encode_for_reward(tokenizer, ex.messages, a, max_length=cfg.data.max_length) for ex, a in pairs], what
