"""Reward model: Bradley-Terry on pairs, rankings and ratings, one score per aspect (InstructGPT step 2).

    alignkit rm --config configs/rm/tiny.yaml
    accelerate launch scripts/train_rm.py --config configs/rm/tiny.yaml
    alignkit rm-eval --model runs/rm-tiny/final --data builtin:pairs:eval --json

Reads top to bottom: accelerator -> tokenizer -> data (validated, aggregated and turned
into comparisons before the model loads) -> model -> fit -> normalise -> evaluate -> save.

One training element is one prompt with its K answers and every comparison made on
them (winner, loser, margin, aspect, tie): a pair is K = 2, a ranking of K answers
gives its C(K, 2) pairs, ratings become pairs within a prompt, aspect and annotator.
Each answer goes through the model once and the loss is averaged over the prompt's
pairs first, then over the prompts of the global batch (Ouyang et al. 2022, sec. 3.5).

Training packs (data.packing, on by default): a micro-batch's answers share rows, each
element's prompt tokens once with its answers branching off it (a tree mask, restarting
positions), and each answer's score is read from the backbone's hidden state at its own
last token through the score head (``pack_elements``, ``RewardForward``): the same numbers
as the padded forward, without padding or repeated prompts. Under bf16 on CPU attention
runs in fp32 (``engine.use_fp32_attention_on_cpu``), the fast kernel there.

The reward is read at the last non-pad token, exactly as
``AutoModelForSequenceClassification`` pools, so ``output_dir/final`` loads there and
gives the same raw scores. Its ``config.json`` carries ``alignkit_reward``:
``{"aspects", "weights", "offset", "scale"}``; normalised = (raw - offset) / scale per
aspect, and "the reward" = sum(weights * normalised).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, NamedTuple

import torch

from alignkit import engine
from alignkit.config import ConfigError, DataConfig, LogConfig, ModelConfig, TrainConfig
from alignkit.losses import MARGIN_TABLES, centering_loss, pairwise_ranking_loss, plackett_luce_loss, ranking_to_pairs
from alignkit.modeling import count_parameters, export_merged, is_peft, load_model, load_tokenizer
from alignkit.schema import DataError, Example, Label, load_examples, select_rows
from alignkit.sft import EpochSampler
from alignkit.tokenization import encode_answer, encode_prompt, fit_length

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

    def __post_init__(self):
        choices = {"margin": ("none", "label", *MARGIN_TABLES), "ties": ("drop", "equal"),
                   "rankings": ("pairs", "plackett_luce"), "annotators": ("aggregate", "each"),
                   "aggregation": ("majority", "dawid_skene", "bradley_terry")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"rm.{key}: must be one of {list(allowed)}, got {getattr(self, key)!r}")
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


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # packing: pack each micro-batch's answers into rows (prompt once per element, tree mask; see pack_elements).
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=["builtin:pairs"], packing=True))
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rm: RewardSettings = field(default_factory=RewardSettings)
    output_dir: str = "runs/rm"


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


# ----------------------------------------------------------------------------- batches and loss


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
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **batch}


def read_position(seq: list[int], pad_token_id: int | None) -> int:
    """Where ``AutoModelForSequenceClassification`` reads a sequence's score: its rightmost token that is
    not ``pad_token_id`` (the answer's EOS, or the token before it when pad = eos); 0 if every token is pad."""
    if pad_token_id is None:
        return len(seq) - 1
    for k in range(len(seq) - 1, -1, -1):
        if seq[k] != pad_token_id:
            return k
    return 0


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
                  share_prefix: bool = True, min_row_length: int = PACK_ROW_LENGTH) -> dict:
    """The answers of a micro-batch packed into rows of at most ``row_length`` tokens, no padding compute.

    Each element's prompt tokens (the common prefix of its answers) appear once and every answer's
    remaining tokens follow, attending to that prefix and to themselves only (a tree mask; several
    elements share a row, isolated by the mask). Positions restart per element and an answer's tokens
    continue from the prefix, so every token sees exactly what it sees in its own unpadded sequence.
    Rows hold ``max(min_row_length, longest unit)`` tokens, at most ``row_length`` (a unit is an element's
    prompt with as many of its answers as fit in ``row_length``). Returns the comparison tensors of
    ``collate_elements`` plus ``input_ids``/``position_ids`` (R, L), a
    (R, 1, L, L) bool ``attention_mask`` and ``read_index`` (N,): where each answer's score is read in the
    flattened (R * L) tokens, in the flat answer order of ``collate_elements``.
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
                t += n
            u_id += 1
    same = (unit_of[:, :, None] == unit_of[:, None, :]) & (unit_of[:, None, :] >= 0)
    tree = (branch[:, None, :] < 0) | (branch[:, :, None] == branch[:, None, :])
    mask = same & tree & torch.tril(torch.ones(length, length, dtype=torch.bool))
    mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no all-masked softmax row
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
            "read_index": read_index, **batch}


def packable(model) -> bool:
    """Whether ``RewardForward`` can run the model packed: a backbone under ``base_model_prefix`` whose
    last hidden state goes through a ``score`` head (every ``*ForSequenceClassification`` of a causal LM)."""
    base = model.get_base_model() if is_peft(model) else model
    prefix = getattr(base, "base_model_prefix", None)
    return isinstance(getattr(base, prefix, None) if prefix else None, torch.nn.Module) and \
        isinstance(getattr(base, "score", None), torch.nn.Module)


class RewardForward(torch.nn.Module):
    """The training forward: (N, aspects) raw rewards of a micro-batch, padded or packed.

    Padded (``collate_elements``): the model's own forward and pooling. Packed (``pack_elements``):
    the backbone on the packed rows, then the score head on the hidden state at each answer's
    ``read_index`` -- the same numbers, since the head is applied per token. This wrapper is what
    accelerate prepares (DDP, autocast); the wrapped model stays a standard sequence classifier.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None, read_index=None):
        if read_index is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        base = self.model.get_base_model() if is_peft(self.model) else self.model
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return base.score(hidden.flatten(0, 1)[read_index])


class LossTerms(NamedTuple):
    group_loss_sum: torch.Tensor  # sum over this micro-batch's groups of each group's mean loss
    correct: torch.Tensor  # number of untied pairs scored the right way round
    pairs: torch.Tensor  # number of untied pairs


def rm_loss_terms(rewards: torch.Tensor, batch: dict) -> LossTerms:
    """rewards: (N, A) raw scores of the batch's answers -> the summed per-group losses.

    Pairs use ``pairwise_ranking_loss`` (mean over each prompt's pairs); each Plackett-Luce
    ranking is its own group. The caller divides by the number of groups in the global batch.
    """
    flat = rewards.float().flatten()
    total = flat.new_zeros(())
    correct = flat.new_zeros(())
    n_pairs = flat.new_zeros(())
    if batch["winners"].numel():
        mean, right = pairwise_ranking_loss(flat, batch["winners"], batch["losers"], group=batch["group"],
                                            margin=batch["margin"], tie=batch["tie"])
        total = total + mean * batch["group"].unique().numel()
        untied = ~batch["tie"]
        correct = (right & untied).sum().float()
        n_pairs = untied.sum().float()
    if batch["rankings"].numel():
        ranked = flat[batch["rankings"]]  # (R, K) scores, best first
        total = total + plackett_luce_loss(ranked, batch["ranking_mask"]) * batch["rankings"].shape[0]
        # Accuracy over the implied pairs of each ranking.
        i, j = torch.triu_indices(ranked.shape[1], ranked.shape[1], 1)
        valid = batch["ranking_mask"][:, i] & batch["ranking_mask"][:, j]
        correct = correct + ((ranked[:, i] > ranked[:, j]) & valid).sum()
        n_pairs = n_pairs + valid.sum()
    return LossTerms(total, correct, n_pairs)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Raw scores (N, aspects), float32 on CPU, of token-id sequences (prompt + answer).

    Sequences are sorted by length so batches carry little padding; the order is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(sequences[i]) for i in idx)
        input_ids = torch.full((len(idx), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), length), dtype=torch.long)
        for b, i in enumerate(idx):
            input_ids[b, :len(sequences[i])] = torch.tensor(sequences[i])
            attention_mask[b, :len(sequences[i])] = 1
        # HF pools at the rightmost token that is not config.pad_token_id: the token training reads too.
        scores = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       use_cache=False).logits.float().cpu()
        for b, i in enumerate(idx):
            out[i] = scores[b]
    if was_training:
        model.train()
    if not out:
        return torch.zeros((0, model.config.num_labels))
    return torch.stack(out)


def encode_texts(tokenizer, prompts, responses, add_eos: bool = True) -> list[list[int]]:
    """prompt (string or conversation) + response -> the token ids the reward model scores."""
    seqs = []
    for prompt, response in zip(prompts, responses):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        answer = encode_answer(tokenizer, response)
        seqs.append(encode_prompt(tokenizer, messages) + (answer if add_eos else answer[:-1]))
    return seqs


def score_texts(model, tokenizer, prompts, responses, batch_size: int = 32, add_eos: bool = True) -> torch.Tensor:
    """Raw reward scores (N, aspects) for prompt/response texts, float32 on CPU.

    The text is rendered as in training: the prompt through the chat template with the
    generation prompt, then the response and EOS (``add_eos=False`` for responses that never ended).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    return score_sequences(model, encode_texts(tokenizer, prompts, responses, add_eos),
                           model.config.pad_token_id, batch_size)


def normalize(raw: torch.Tensor, info: dict) -> torch.Tensor:
    """(N, aspects) raw scores -> (raw - offset) / scale per aspect."""
    offset = torch.tensor(info["offset"], dtype=raw.dtype, device=raw.device)
    scale = torch.tensor(info["scale"], dtype=raw.dtype, device=raw.device)
    return (raw - offset) / scale


def combined_reward(raw: torch.Tensor, info: dict) -> torch.Tensor:
    """(N, aspects) raw scores -> (N,) "the reward": sum over aspects of weight * normalised score."""
    weights = torch.tensor(info["weights"], dtype=raw.dtype, device=raw.device)
    return (normalize(raw, info) * weights).sum(-1)


def default_info(num_labels: int) -> dict:
    return {"aspects": [f"label_{i}" for i in range(num_labels)] if num_labels > 1 else [OVERALL],
            "weights": [1.0] * num_labels, "offset": [0.0] * num_labels, "scale": [1.0] * num_labels}


def load_reward_model(path: str, dtype: str = "float32", device: str | None = None):
    """Load a saved reward model -> (model, tokenizer, info), model in eval mode.

    ``path`` is ``output_dir/final`` (any AutoModelForSequenceClassification folder works;
    without ``alignkit_reward`` in its config, offsets are 0, scales and weights 1) or a
    LoRA adapter folder (``output_dir/final_adapter``), which is applied to its base model.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.modeling import DTYPES, ModelLoadError, resolve_path

    path = resolve_path(path)
    adapter = os.path.exists(os.path.join(path, "adapter_config.json"))
    info = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if adapter:
            from alignkit.modeling import load_adapter_classifier

            with open(os.path.join(path, "alignkit_reward.json"), encoding="utf-8") as f:
                info = json.load(f)
            model = load_adapter_classifier(path, len(info["aspects"]), tokenizer.pad_token_id, dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load reward model {path}: {e}") from None
    config = model.config
    if config.pad_token_id is None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        config.pad_token_id = tokenizer.pad_token_id
    info = info or getattr(config, "alignkit_reward", None) or default_info(config.num_labels)
    if len(info["aspects"]) != config.num_labels:
        raise ModelLoadError(f"{path}: alignkit_reward names {len(info['aspects'])} aspect(s) but the model has "
                             f"num_labels={config.num_labels}")
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, info


# ----------------------------------------------------------------------------- evaluation


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


def plot_distributions(dists: dict, path: str) -> str | None:
    """PNG histogram of chosen vs rejected rewards, one panel per aspect."""
    if not dists:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ----------------------------------------------------------------------------- normalisation


def reference_sequences(cfg: RMConfig, tokenizer, train_examples: list[Example]) -> tuple[list[list[int]], str]:
    """Token ids of the answers that define mean 0 / std 1: rm.normalize_on's demonstrations,
    else the training data's demonstrations, else every training answer."""
    from alignkit.schema import demonstrations

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
    seqs = encode_texts(tokenizer, [ex.messages for ex, _ in pairs], [a for _, a in pairs])
    return [s[-cfg.data.max_length:] for s in seqs], what


def normalization_stats(model, sequences, pad_token_id) -> tuple[list[float], list[float]]:
    raw = score_sequences(model, sequences, pad_token_id)
    offset = raw.mean(0)
    scale = raw.std(0) if raw.shape[0] > 1 else torch.ones_like(offset)
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))  # a constant scorer keeps scale 1
    return offset.tolist(), scale.tolist()


# ----------------------------------------------------------------------------- training


def prepare_rm_data(cfg: RMConfig, tokenizer):
    """Load, validate, aggregate and tokenize train and eval data; all problems raised together."""
    problems, out, stats, train_examples = [], [], {"rows": {}}, []
    for split, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)):
        if not files:
            out.append([])
            continue
        try:
            examples, account = select_rows(load_examples(files, seed=cfg.train.seed), "rm", cfg.data.on_unusable,
                                            cfg.data.max_unusable_fraction, split, evaluation=split == "eval")
            stats["rows"][split] = account.to_dict()
            if split == "train":
                train_examples = examples
            elements, s = build_elements(examples, cfg.rm, tokenizer, cfg.data.max_length, cfg.data.truncation,
                                         evaluation=split == "eval")
            if split == "train" and not elements:
                raise DataError([f"{', '.join(files)}: labels: no comparisons found (the reward model needs "
                                 "pairwise, ranking or rating labels, or {prompt, chosen, rejected} rows)"])
        except DataError as e:
            problems.extend(e.problems)
            out.append([])
            continue
        stats[split] = s
        out.append(elements)
    if problems:
        raise DataError(problems)
    return out[0], out[1], stats, train_examples


def train_rm(cfg: RMConfig) -> dict:
    accelerator = engine.make_accelerator(cfg.train, cfg.log, cfg.output_dir)
    engine.seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_elements, eval_elements, data_stats, train_examples = prepare_rm_data(cfg, tokenizer)
    row_accounts = data_stats.pop("rows")
    ref_sequences, ref_what = reference_sequences(cfg, tokenizer, train_examples)
    del train_examples

    aspects, A = list(cfg.rm.aspects), len(cfg.rm.aspects)
    model = load_model(cfg.model, task="reward", num_labels=A, pad_token_id=tokenizer.pad_token_id)
    model.config.use_cache = False  # no KV cache while training
    engine.use_fp32_attention_on_cpu(model, accelerator)
    trainable, total = count_parameters(model)
    # `model` stays the plain sequence classifier (evaluated, checkpointed and saved as such); accelerate
    # prepares the training forward around it. Packed, each answer's score is read at its own last token.
    packed = cfg.data.packing and packable(model)
    pad_id = model.config.pad_token_id

    def collate(elements):
        if packed:
            return pack_elements(elements, pad_id, A, cfg.data.max_length)
        return collate_elements(elements, tokenizer.pad_token_id, A)

    bs, accum = cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps
    train_loader = torch.utils.data.DataLoader(train_elements, batch_size=bs, collate_fn=collate,
                                               sampler=EpochSampler(len(train_elements), cfg.train.seed))
    steps_per_epoch, total_steps = engine.plan_steps(len(train_elements), accelerator, cfg.train)
    optimizer, scheduler = engine.make_optimizer(model, cfg.train, total_steps)
    forward, optimizer, train_loader = accelerator.prepare(RewardForward(model), optimizer, train_loader)
    step, _, logger = engine.start_run(accelerator, cfg, {"model": model}, {"model": optimizer}, {"model": scheduler})
    # Until the normalisation is measured after training, evaluate the raw scores with the configured weights.
    info = {"aspects": aspects, "weights": cfg.rm.weights, "offset": [0.0] * A, "scale": [1.0] * A}

    def run_eval(at_step):
        metrics, dists = evaluate(model, eval_elements, info, tokenizer.pad_token_id, accelerator)
        logger.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=at_step)
        return metrics, dists

    eval_before = run_eval(0)[0] if eval_elements and step == 0 else None

    forward.train()
    bar = engine.progress(accelerator, total_steps, initial=step, desc="rm", enabled=cfg.log.progress)
    world = accelerator.num_processes
    start, pairs_seen, answers_seen, last_log = time.time(), 0, 0, {}
    epoch = step // steps_per_epoch
    batches = _micro_batches(accelerator, train_loader, epoch, skip=(step % steps_per_epoch) * accum)
    while step < total_steps:
        group = []
        for _ in range(accum):
            mb = next(batches, None)
            if mb is None:  # epoch ended: next epoch's order
                epoch += 1
                batches = _micro_batches(accelerator, train_loader, epoch, skip=0)
                mb = next(batches)
            group.append(mb)
        # Every prompt (group) of the global batch weighs the same, whatever the micro-batch or process.
        local_groups = sum(mb["num_groups"] for mb in group).to(accelerator.device).float()
        global_groups = accelerator.reduce(local_groups.clone(), "sum").clamp(min=1)
        loss_total = torch.zeros((), device=accelerator.device)
        correct, n_pairs = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for i, mb in enumerate(group):
            sync = i == len(group) - 1
            with nullcontext() if sync else accelerator.no_sync(forward):
                rewards = forward(mb["input_ids"], mb["attention_mask"], mb.get("position_ids"),
                                  mb.get("read_index"))  # (N, A)
                terms = rm_loss_terms(rewards, mb)
                # DDP averages gradients over processes; multiply back so the result is the global group mean.
                loss = terms.group_loss_sum * world / global_groups
                if cfg.rm.center_coef:
                    loss = loss + cfg.rm.center_coef * centering_loss(rewards.float()) / len(group)
                accelerator.backward(loss)
            loss_total += terms.group_loss_sum.detach()
            correct += terms.correct
            n_pairs += terms.pairs
            pairs_seen += int(terms.pairs)
            answers_seen += mb["read_index"].numel() if packed else mb["input_ids"].shape[0]
        train_loss = accelerator.reduce(loss_total, "sum") / global_groups
        engine.check_finite(train_loss, "training loss", step, cfg.output_dir)
        grad_norm = engine.optimizer_step(accelerator, forward.parameters(), optimizer, scheduler, cfg.train.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            elapsed = time.time() - start
            acc = accelerator.reduce(correct, "sum") / accelerator.reduce(n_pairs, "sum").clamp(min=1)
            last_log = {"train/loss": train_loss.item(), "train/accuracy": acc.item(),
                        "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": epoch, "train/pairs_per_second": pairs_seen * world / max(elapsed, 1e-9),
                        "train/answers_per_second": answers_seen * world / max(elapsed, 1e-9)}
            logger.log(last_log, step=step)
            bar.set_postfix(loss=f"{train_loss.item():.4f}", acc=f"{acc.item():.3f}")
        if eval_elements and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            engine.save_checkpoint(accelerator, cfg.output_dir, step, {"model": model}, {"model": optimizer},
                                   {"model": scheduler}, {"epoch": epoch}, keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    # InstructGPT: shift (and scale) so the reference answers score mean 0, std 1 per aspect.
    offset, scale = normalization_stats(model, ref_sequences, tokenizer.pad_token_id)
    info = {"aspects": aspects, "weights": cfg.rm.weights, "offset": offset, "scale": scale}
    eval_after, dists = run_eval(step) if eval_elements else (None, {})
    accelerator.wait_for_everyone()
    final_dir = os.path.join(cfg.output_dir, "final")
    plot = None
    if accelerator.is_main_process:
        save_reward_model(model, tokenizer, cfg, info)
        plot = plot_distributions(dists, os.path.join(cfg.output_dir, "reward_distributions.png"))
    summary = {
        "stage": "rm", "steps": step, "train_loss": last_log.get("train/loss"),
        "train_accuracy": last_log.get("train/accuracy"), "eval_before": eval_before, "eval": eval_after,
        "normalization": {"offset": offset, "scale": scale, "reference": ref_what, "answers": len(ref_sequences)},
        "aspects": aspects, "weights": cfg.rm.weights, "runtime_seconds": round(runtime, 2),
        "pairs_per_second": last_log.get("train/pairs_per_second"), "trainable_parameters": trainable,
        "total_parameters": total, "num_processes": world, "rows": row_accounts, "data": data_stats,
        "final_dir": final_dir, "distributions_png": plot,
    }
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_reward_model(model, tokenizer, cfg: RMConfig, info: dict) -> str:
    """Write ``output_dir/final`` (a plain AutoModelForSequenceClassification folder whose config carries
    ``alignkit_reward``) and, with LoRA, ``output_dir/final_adapter`` (adapter + fully trained score head);
    ``final`` is then the merged model."""
    final_dir = os.path.join(cfg.output_dir, "final")
    aspects = info["aspects"]
    label_maps = {"id2label": dict(enumerate(aspects)), "label2id": {a: i for i, a in enumerate(aspects)}}
    if is_peft(model):
        adapter_dir = os.path.join(cfg.output_dir, "final_adapter")
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        engine.write_json(os.path.join(adapter_dir, "alignkit_reward.json"), info)
        export_merged(adapter_dir, final_dir, cfg.model, num_labels=len(info["aspects"]))
        path = os.path.join(final_dir, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config.update(label_maps, alignkit_reward=info, use_cache=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    else:
        model.config.alignkit_reward = info
        model.config.id2label, model.config.label2id = label_maps["id2label"], label_maps["label2id"]
        model.config.use_cache = True
        model.save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
    return final_dir


def _micro_batches(accelerator, loader, epoch: int, skip: int):
    loader.set_epoch(epoch)
    it = accelerator.skip_first_batches(loader, skip) if skip else loader
    yield from it


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
    metrics, dists = evaluate(model, elements, info, model.config.pad_token_id, batch_size=batch_size)
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
