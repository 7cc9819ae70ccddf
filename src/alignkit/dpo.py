"""Offline preference optimisation on the feedback schema: DPO / IPO / conservative DPO, and KTO.

    alignkit dpo --config configs/dpo/tiny.yaml
    alignkit kto --config configs/kto/tiny.yaml
    accelerate launch scripts/train_dpo.py --config configs/dpo/tiny.yaml

Reads top to bottom: accelerator -> tokenizer -> data (validated, aggregated and turned into
elements before any model loads) -> model -> reference log-probs (once) -> fit -> evaluate -> save.

* DPO reads pairwise labels and rankings (a ranking of K answers gives its C(K, 2) pairs), with
  several annotators aggregated or kept, exactly as the reward stage turns them into comparisons
  (``rm_data.aggregate``, ``rm_data.comparisons_of``). One element is one prompt with its answers and pairs:
  each answer goes through the model once, the loss is the mean over the prompt's pairs, then over
  the prompts of the global batch (InstructGPT sec. 3.5, as in the reward stage).
* KTO reads binary good/bad labels; rows that hold comparisons instead are unpaired (an answer
  that only ever wins is desirable, one that only ever loses undesirable). One element is one
  answer plus a *mismatched* sequence (its prompt with another row's answer) for the KL reference
  point z0 (Ethayarajh et al. 2024, sec. 4.1).

A sequence's log-prob is the sum over its answer tokens (Rafailov et al. 2023). Reference
log-probs are computed once before training: with the policy itself before its first update
(full fine-tuning: no frozen copy is ever kept), with the LoRA adapter switched off, or with
``dpo.reference`` (loaded, used, freed). They are written to ``output_dir/reference_logps.safetensors``
so ``--resume`` does not need the starting model. With ``data.packing`` a micro-batch's answers
share rows and each prompt appears once (``rm_data.pack_elements``, tree mask); the LM head runs only on
the positions that predict answer tokens.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from alignkit import engine
from alignkit.config import ConfigError, DataConfig, LogConfig, ModelConfig, TrainConfig, check_packing
from alignkit.losses import (
    dpo_loss,
    dpo_rewards,
    ipo_loss,
    kto_default_weights,
    kto_loss,
    kto_reference_point,
)
from alignkit.adapters import adapters_off
from alignkit.modeling import (
    check_packing_window,
    check_reference_vocab,
    count_parameters,
    is_peft,
    load_model,
    load_tokenizer,
    save_model,
)
from alignkit.rm_data import (
    OVERALL,
    RewardSettings,
    RMElement,
    aggregate,
    comparisons_of,
    pack_elements,
    validate_labels,
)
from alignkit.schema import DataError, Example, feedback_counts, prepare_splits
from alignkit.sft import make_loader
from alignkit.tokenization import IGNORE_INDEX, encode_answer, encode_prompt, fit_length, right_pad

PAIR_KINDS = ("pairwise", "ranking")


@dataclass
class PreferenceData:
    # Several annotators on one item: aggregate their labels first, or train on each annotator's labels (each).
    annotators: str = "aggregate"
    # majority or dawid_skene (alignkit.feedback.aggregate), as in the reward stage.
    aggregation: str = "majority"
    # Labels of this aspect are used (a label without an aspect is "overall"); other aspects are skipped.
    aspect: str = OVERALL

    def __post_init__(self):
        if self.annotators not in ("aggregate", "each"):
            raise ConfigError(f"annotators: must be aggregate or each, got {self.annotators!r}")
        if self.aggregation not in ("majority", "dawid_skene"):
            raise ConfigError(f"aggregation: must be majority or dawid_skene, got {self.aggregation!r}")


@dataclass
class DPOSettings(PreferenceData):
    # sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023; log-ratios averaged per answer token).
    loss: str = "sigmoid"
    # KL strength beta (IPO's tau): larger stays closer to the reference.
    beta: float = 0.1
    # Conservative DPO: probability that a label is flipped (sigmoid loss only).
    label_smoothing: float = 0.0
    # Weight of an SFT term on the chosen answer (mean NLL per token) added to each pair's loss: RPO
    # (Pang et al. 2024, "Iterative reasoning preference optimization"; TRL's rpo_alpha). DPO alone
    # can lower the chosen answer's likelihood too, and small models then lose their grammar.
    sft_coef: float = 0.0
    # Reference model folder; null: the policy's starting weights (LoRA: the adapter switched off).
    reference: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.sft_coef < 0:
            raise ConfigError("dpo.sft_coef: must be >= 0")
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"dpo.loss: must be sigmoid or ipo, got {self.loss!r}")
        if self.beta <= 0:
            raise ConfigError("dpo.beta: must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss == "ipo":
            raise ConfigError("dpo.label_smoothing: applies to the sigmoid loss only (conservative DPO)")


@dataclass
class KTOSettings(PreferenceData):
    beta: float = 0.1
    # lambda_D and lambda_U; null: the paper's rule, lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    desirable_weight: Optional[float] = None
    undesirable_weight: Optional[float] = None
    reference: Optional[str] = None
    # Weight of an SFT term on each desirable answer (mean NLL per token), as dpo.sft_coef: KTO alone
    # pushes undesirable answers down faster than it lifts desirable ones, and a small model loses its grammar.
    sft_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError("kto.beta: must be > 0")
        if self.sft_coef < 0:
            raise ConfigError("kto.sft_coef: must be >= 0")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"kto.{key}: must be > 0")


@dataclass
class DPOConfig:
    # The policy to optimise (an SFT output); LoRA / 8-/4-bit settings apply to it.
    model: ModelConfig = field(default_factory=ModelConfig)
    # packing: a micro-batch's answers share rows, each prompt once (rm_data.pack_elements).
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=["builtin:pairs"]))
    # per_device_batch_size counts prompts (elements), each with its answers and pairs.
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    output_dir: str = "runs/dpo"

    def __post_init__(self):
        check_packing(self.model, self.data)


@dataclass
class KTOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=["builtin:binary"]))
    # per_device_batch_size counts answers; z0 is estimated on each micro-batch, so keep it > 1.
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kto: KTOSettings = field(default_factory=KTOSettings)
    output_dir: str = "runs/kto"

    def __post_init__(self):
        check_packing(self.model, self.data)
        if self.train.per_device_batch_size < 2:
            raise ConfigError("train.per_device_batch_size: KTO estimates z0 on each micro-batch, use at least 2")


# ----------------------------------------------------------------------------- data -> elements


@dataclass
class Element:
    """One prompt's sequences (prompt + answer token ids) and what the loss compares on them.

    DPO: every answer once and the (chosen, rejected) pairs between them. KTO: sequences[0] is the
    labelled answer (``desirable``), sequences[1] the mismatched one for z0.
    """

    sequences: list[list[int]]
    answer_starts: list[int]  # index of each sequence's first answer token
    source: str
    pairs: list[tuple[int, int]] = field(default_factory=list)
    desirable: bool | None = None
    ref_logps: list[float] = field(default_factory=list)  # filled once before training


def _only(examples: list[Example], kinds) -> list[Example]:
    return [Example(prompt=ex.prompt, answers=ex.answers, labels=[lab for lab in ex.labels if lab.kind in kinds],
                    id=ex.id, meta=ex.meta, source=ex.source) for ex in examples]


def _found(counts: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing"


def _settings(pref: PreferenceData, examples: list[Example]) -> RewardSettings:
    """The reward stage's comparison settings for one aspect; every other aspect is skipped, ties dropped."""
    present = {lab.aspect or OVERALL for ex in examples for lab in ex.labels} - {pref.aspect}
    return RewardSettings(aspects=[pref.aspect], skip_aspects=sorted(present), ties="drop",
                          annotators=pref.annotators, aggregation=pref.aggregation)


class AnswerEncoder:
    """Prompt + answer token ids through the one tokenization owner; prompts encoded once."""

    def __init__(self, tokenizer, data: DataConfig):
        self.tokenizer, self.data, self.prompts, self.problems = tokenizer, data, {}, []

    def __call__(self, ex: Example, answer: str, policy: str | None = None):
        key = repr(ex.prompt)
        if key not in self.prompts:
            self.prompts[key] = encode_prompt(self.tokenizer, ex.messages)
        fitted = fit_length(self.prompts[key], encode_answer(self.tokenizer, answer), self.data.max_length,
                            policy or self.data.truncation, ex.source, self.problems)
        return None if fitted is None else (fitted[0] + fitted[1], len(fitted[0]))


def dpo_elements(examples: list[Example], pref: DPOSettings, tokenizer, data: DataConfig, where: str):
    """Pairs and rankings -> one element per prompt; every problem is raised together."""
    counts = feedback_counts(examples)
    if not any(counts[k] for k in PAIR_KINDS):
        raise DataError([f"{where}: labels: DPO needs comparisons (pairwise or ranking labels, or "
                         f"{{prompt, chosen, rejected}} rows), found {_found(counts)}"])
    examples = _only(examples, PAIR_KINDS)
    settings = _settings(pref, examples)
    validate_labels(examples, settings)
    if settings.annotators == "aggregate":
        examples = aggregate(examples, settings.aggregation)
    encode, elements, stats = AnswerEncoder(tokenizer, data), [], {"pairs": 0, "dropped_answers": 0}
    for ex in examples:
        comps, _ = comparisons_of(ex, settings)
        pairs = [(c.winner, c.loser) for c in comps if not c.tie]
        used = sorted({j for p in pairs for j in p})
        encoded = {j: encode(ex, ex.answers[j]) for j in used}
        pairs = [(w, l_) for w, l_ in pairs if encoded[w] is not None and encoded[l_] is not None]
        stats["dropped_answers"] += sum(v is None for v in encoded.values())
        if not pairs:
            continue
        keep = sorted({j for p in pairs for j in p})
        slot = {j: i for i, j in enumerate(keep)}
        elements.append(Element([encoded[j][0] for j in keep], [encoded[j][1] for j in keep], ex.source,
                                pairs=[(slot[w], slot[l_]) for w, l_ in pairs]))
        stats["pairs"] += len(pairs)
    if encode.problems:
        raise DataError(encode.problems)
    if not elements:
        raise DataError([f"{where}: labels: no untied pair of aspect {pref.aspect!r} left for DPO "
                         f"(found {_found(counts)})"])
    stats["elements"] = len(elements)
    return elements, stats


def kto_elements(examples: list[Example], pref: KTOSettings, tokenizer, data: DataConfig, where: str, seed: int):
    """Binary labels (or unpaired comparisons) -> one element per labelled answer with a mismatched partner."""
    counts = feedback_counts(examples)
    if not counts["binary"] and not any(counts[k] for k in PAIR_KINDS):
        raise DataError([f"{where}: labels: KTO needs binary good/bad labels ({{prompt, completion, label}} rows) "
                         f"or comparisons to unpair, found {_found(counts)}"])
    examples = _only(examples, ("binary", *PAIR_KINDS))
    settings = _settings(pref, examples)
    validate_labels(examples, settings)
    if settings.annotators == "aggregate":
        examples = aggregate(examples, settings.aggregation)
    rows, unpaired = [], 0  # (example, answer index, desirable)
    for ex in examples:
        binary = [lab for lab in ex.labels if lab.kind == "binary" and (lab.aspect or OVERALL) == pref.aspect]
        if binary:
            rows += [(ex, lab.answer, bool(lab.good)) for lab in binary]
            continue
        comps, _ = comparisons_of(ex, settings)
        winners, losers = {c.winner for c in comps if not c.tie}, {c.loser for c in comps if not c.tie}
        rows += [(ex, j, True) for j in sorted(winners - losers)] + [(ex, j, False) for j in sorted(losers - winners)]
        unpaired += len(winners ^ losers)
    n_good = sum(d for _, _, d in rows)
    if not n_good or n_good == len(rows):
        have, miss = ("desirable", "undesirable") if n_good else ("undesirable", "desirable")
        raise DataError([f"{where}: labels: KTO needs both desirable and undesirable answers, but all {len(rows)} "
                         f"labelled answers of aspect {pref.aspect!r} are {have} (no {miss} one)"])
    encode, elements = AnswerEncoder(tokenizer, data), []
    answers = [encode(ex, ex.answers[j]) for ex, j, _ in rows]
    # z0's mismatched pairs: each row's prompt with the answer of the row after it in a seeded order.
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    for i, ((ex, j, good), enc) in enumerate(zip(rows, answers)):
        other_ex, other_j, _ = rows[partner[i]]
        mismatched = encode(ex, other_ex.answers[other_j], policy="truncate")
        if enc is None:
            continue
        elements.append(Element([enc[0], mismatched[0]], [enc[1], mismatched[1]], ex.source, desirable=good))
    if encode.problems:
        raise DataError(encode.problems)
    n_good = sum(el.desirable for el in elements)
    stats = {"elements": len(elements), "desirable": n_good, "undesirable": len(elements) - n_good,
             "unpaired_from_comparisons": unpaired, "dropped_answers": len(rows) - len(elements)}
    return elements, stats


def prepare_data(cfg, tokenizer):
    """Train and eval elements of the DPO or KTO stage; all problems raised before any model loads."""
    kto = isinstance(cfg, KTOConfig)

    def build(examples, split, files):
        if kto:
            return kto_elements(examples, cfg.kto, tokenizer, cfg.data, ", ".join(files), cfg.train.seed)
        return dpo_elements(examples, cfg.dpo, tokenizer, cfg.data, ", ".join(files))

    return prepare_splits(cfg.data, cfg.train.seed, "kto" if kto else "dpo", build)


# ----------------------------------------------------------------------------- batches and log-probs


def collate(elements: list[Element], pad_token_id: int, max_length: int, packing: bool,
            attn_implementation: str | None = "sdpa") -> dict:
    """The micro-batch's sequences, flat in element order, and where their answer tokens are predicted.

    ``pred_index`` (M,): flat position (in the (rows * length) tokens) whose logits predict answer token
    ``target_ids`` (M,) of sequence ``seq_of`` (M,). Packed: ``rm_data.pack_elements`` rows (tree mask, each
    prompt once); padded: one right-padded row per sequence.
    """
    seqs = [s for el in elements for s in el.sequences]
    starts = [a for el in elements for a in el.answer_starts]
    if packing:
        rm_elements = [RMElement(el.sequences, [], [], el.source) for el in elements]
        batch = pack_elements(rm_elements, pad_token_id, 1, max_length, attn_implementation=attn_implementation)
        token_index = batch["token_index"]
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    else:
        input_ids, attention_mask = right_pad(seqs, pad_token_id)
        length = input_ids.shape[1]
        token_index = torch.arange(len(seqs))[:, None] * length + torch.arange(length)[None]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": torch.arange(length).expand(len(seqs), length).clone()}
    pred, target, seq_of = [], [], []
    for j, (s, a) in enumerate(zip(seqs, starts)):
        pred.append(token_index[j, a - 1:len(s) - 1])
        target += s[a:]
        seq_of += [j] * (len(s) - a)
    ref = [x for el in elements for x in el.ref_logps]
    return {**batch, "pred_index": torch.cat(pred), "target_ids": torch.tensor(target, dtype=torch.long),
            "seq_of": torch.tensor(seq_of, dtype=torch.long), "num_seqs": torch.tensor(len(seqs)),
            "answer_lengths": torch.tensor([len(s) - a for s, a in zip(seqs, starts)], dtype=torch.float),
            "ref_logps": torch.tensor(ref, dtype=torch.float) if ref else torch.zeros(0)}


class SequenceLogprobs(torch.nn.Module):
    """The training forward: summed answer-token log-probs (N,) of a causal LM on a collated micro-batch.

    The backbone runs on the (packed or padded) rows; the LM head only on the positions that predict
    an answer token, so no (rows, length, vocab) logits are built. This wrapper is what accelerate
    prepares (DDP, autocast); the wrapped model stays a standard causal LM.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, pred_index, target_ids, seq_of, num_seqs):
        base = self.model.get_base_model() if is_peft(self.model) else self.model
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden.flatten(0, 1)[pred_index]).float()
        cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        if cap:  # Gemma 2 style soft-capping is part of the model's distribution
            logits = cap * torch.tanh(logits / cap)
        token_logps = logits.gather(-1, target_ids[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        return token_logps.new_zeros(int(num_seqs)).index_add(0, seq_of, token_logps)


def answer_logprobs(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Summed log-probs (B,) of the tokens where ``labels != IGNORE_INDEX`` in right-padded rows (the SFT
    label layout); position t predicts token t + 1. Same computation as the training forward."""
    B, L = input_ids.shape
    b, k = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return SequenceLogprobs(model)(input_ids, attention_mask, position_ids, b * L + k, input_ids[b, k + 1], b,
                                   torch.tensor(B))


def _forward(fwd, batch):
    return fwd(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["pred_index"],
               batch["target_ids"], batch["seq_of"], batch["num_seqs"])


@torch.no_grad()
def reference_logprobs(model, elements: list[Element], pad_token_id: int, max_length: int, packing: bool,
                       batch_size: int, device) -> list[list[float]]:
    """Summed answer log-probs of every element's sequences under ``model`` (LoRA: the adapter off)."""
    was_training = model.training
    model.eval()
    fwd, out = SequenceLogprobs(model), []
    with adapters_off(model) if is_peft(model) else nullcontext():
        for i in range(0, len(elements), batch_size):
            chunk = elements[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id, max_length, packing,
                                                            model.config._attn_implementation).items()}
            flat = _forward(fwd, batch).float().cpu().tolist()
            for el in chunk:
                out.append(flat[:len(el.sequences)])
                flat = flat[len(el.sequences):]
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- losses


class Terms(NamedTuple):
    loss_sum: torch.Tensor  # sum of per-unit losses (DPO: per prompt, mean over its pairs; KTO: per answer)
    units: torch.Tensor  # number of units in this micro-batch
    stats: dict  # sums to be divided by stats["count"] after reduction


def dpo_terms(logps, batch, elements_pairs, s: DPOSettings) -> Terms:
    """DPO/IPO losses of a micro-batch: mean over each prompt's pairs, summed over its prompts."""
    ref = batch["ref_logps"]
    offsets, chosen, rejected, group = 0, [], [], []
    for g, (n, pairs) in enumerate(elements_pairs):
        chosen += [offsets + w for w, _ in pairs]
        rejected += [offsets + l_ for _, l_ in pairs]
        group += [g] * len(pairs)
        offsets += n
    c, r = torch.tensor(chosen, device=logps.device), torch.tensor(rejected, device=logps.device)
    group = torch.tensor(group, device=logps.device)
    if s.loss == "ipo":
        lengths = batch["answer_lengths"]
        losses = ipo_loss(logps[c], logps[r], ref[c], ref[r], s.beta, lengths[c], lengths[r])
    else:
        losses = dpo_loss(logps[c], logps[r], ref[c], ref[r], s.beta, s.label_smoothing)
    if s.sft_coef:
        losses = losses + s.sft_coef * -logps[c] / batch["answer_lengths"][c].clamp(min=1)
    n_groups = len(elements_pairs)
    per_group = losses.new_zeros(n_groups).index_add(0, group, losses)
    count = losses.new_zeros(n_groups).index_add(0, group, torch.ones_like(losses))
    rc, rr = dpo_rewards(logps[c], ref[c], s.beta), dpo_rewards(logps[r], ref[r], s.beta)
    stats = {"count": float(len(chosen)), "rewards/accuracy": (rc > rr).float().sum(),
             "rewards/margin": (rc - rr).sum(), "rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(),
             "logps/chosen": logps[c].detach().sum(), "logps/rejected": logps[r].detach().sum()}
    return Terms((per_group / count).sum(), torch.tensor(float(n_groups)), stats)


def kto_terms(logps, batch, desirable, s: KTOSettings, weights, accelerator) -> Terms:
    """KTO losses of a micro-batch: sequences alternate (answer, mismatched answer) per element."""
    ref = batch["ref_logps"]
    pol, ref_pol, kl_pol, kl_ref = logps[0::2], ref[0::2], logps[1::2], ref[1::2]
    # z0 from this micro-batch's mismatched pairs, averaged over processes in training (no gradient either way).
    z0 = kto_reference_point(kl_pol.float(), kl_ref)
    if accelerator is not None:
        z0 = accelerator.reduce(z0.clone(), "mean").clamp(min=0)
    losses = kto_loss(pol, ref_pol, desirable, z0, s.beta, *weights)
    if s.sft_coef:
        nll = -pol / batch["answer_lengths"][0::2].clamp(min=1)
        losses = losses + s.sft_coef * torch.where(desirable, nll, torch.zeros_like(nll))
    rewards = dpo_rewards(pol, ref_pol, s.beta)
    d = desirable.float()
    stats = {"count": float(len(losses)), "kl": z0 * len(losses), "desirable": d.sum(),
             "rewards/desirable_sum": (rewards * d).sum(), "rewards/undesirable_sum": (rewards * (1 - d)).sum()}
    return Terms(losses.sum(), torch.tensor(float(len(losses))), stats)


def _terms(cfg, logps, batch, elements, weights, accelerator) -> Terms:
    if isinstance(cfg, KTOConfig):
        desirable = torch.tensor([el.desirable for el in elements], device=logps.device)
        return kto_terms(logps, batch, desirable, cfg.kto, weights, accelerator)
    return dpo_terms(logps, batch, [(len(el.sequences), el.pairs) for el in elements], cfg.dpo)


def _finish(stats_sum: dict, kto: bool) -> dict:
    """Means of summed statistics (KTO reward means per class)."""
    n = max(stats_sum.pop("count"), 1.0)
    if not kto:
        return {k: v / n for k, v in stats_sum.items()}
    good = stats_sum.pop("desirable")
    return {"kl": stats_sum["kl"] / n, "rewards/desirable": stats_sum["rewards/desirable_sum"] / max(good, 1.0),
            "rewards/undesirable": stats_sum["rewards/undesirable_sum"] / max(n - good, 1.0)}


@torch.no_grad()
def evaluate(cfg, model, elements, weights, pad_token_id, accelerator) -> dict:
    """Held-out loss and metrics (reward accuracy, margins, log-probs; KTO: z0 and rewards by class)."""
    model.eval()
    fwd, total, units, sums = SequenceLogprobs(model), 0.0, 0.0, {}
    mine = elements[accelerator.process_index::accelerator.num_processes]
    bs = cfg.train.per_device_batch_size
    for i in range(0, len(mine), bs):
        chunk = mine[i:i + bs]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_token_id, cfg.data.max_length,
                                                                   cfg.data.packing,
                                                                   model.config._attn_implementation).items()}
        # accelerator=None: KTO's z0 stays per process here (processes may hold different numbers of chunks).
        terms = _terms(cfg, _forward(fwd, batch).float(), batch, chunk, weights, None)
        total, units = total + float(terms.loss_sum), units + float(terms.units)
        for k, v in terms.stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train()
    keys = sorted(sums)
    t = accelerator.reduce(torch.tensor([total, units] + [sums[k] for k in keys], device=accelerator.device), "sum")
    reduced = dict(zip(keys, t[2:].tolist()))
    return {"loss": t[0].item() / max(t[1].item(), 1.0), **_finish(reduced, isinstance(cfg, KTOConfig))}


# ----------------------------------------------------------------------------- training


def train_dpo(cfg: DPOConfig) -> dict:
    return _train(cfg, "dpo")


def train_kto(cfg: KTOConfig) -> dict:
    return _train(cfg, "kto")


def _train(cfg, stage: str) -> dict:
    settings = cfg.kto if stage == "kto" else cfg.dpo
    accelerator = engine.make_accelerator(cfg.train, cfg.log, cfg.output_dir)
    engine.seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_elements, eval_elements, data_stats = prepare_data(cfg, tokenizer)
    row_accounts = data_stats.pop("rows")
    if settings.reference:
        check_reference_vocab(tokenizer, None, settings.reference, cfg.model, f"{stage}.reference")
    weights = None
    if stage == "kto":
        n_good = data_stats["train"]["desirable"]
        default = kto_default_weights(n_good, len(train_elements) - n_good)
        weights = (settings.desirable_weight or default[0], settings.undesirable_weight or default[1])

    model = load_model(cfg.model, task="causal-lm")
    check_packing_window(model, cfg.data)
    model.config.use_cache = False  # no KV cache while training
    engine.use_fp32_attention_on_cpu(model, accelerator)
    trainable, total = count_parameters(model)
    pad_id, packing, attn = tokenizer.pad_token_id, cfg.data.packing, model.config._attn_implementation

    # Reference log-probs, once: from the run's saved file on resume, else a reference model or the
    # policy before its first update (LoRA: adapter off). Every process computes all of them.
    ref_path = os.path.join(cfg.output_dir, "reference_logps.safetensors")
    everything = train_elements + eval_elements
    resuming = cfg.train.resume and engine.latest_checkpoint(cfg.output_dir) is not None
    ref_start = time.time()
    if resuming:
        ref_logps = _load_reference(ref_path, everything)
    else:
        ref_model = model
        if settings.reference:
            ref_model = load_model(cfg.model, task="causal-lm", trainable=False, path=settings.reference)
            engine.use_fp32_attention_on_cpu(ref_model, accelerator)
        with accelerator.autocast():
            ref_logps = reference_logprobs(ref_model.to(accelerator.device), everything, pad_id, cfg.data.max_length,
                                           packing, cfg.train.per_device_batch_size, accelerator.device)
        del ref_model  # a separate reference is freed here; the policy lives on as `model`
        if accelerator.is_main_process:
            _save_reference(ref_path, ref_logps)
    for el, ref in zip(everything, ref_logps):
        el.ref_logps = ref
    ref_seconds = time.time() - ref_start

    bs, accum = cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps
    # The loader yields elements; each process collates only its own micro-batches.
    train_loader = make_loader(train_elements, bs, list, cfg.train.seed)
    steps_per_epoch, total_steps = engine.plan_steps(len(train_elements), accelerator, cfg.train)
    optimizer, scheduler = engine.make_optimizer(model, cfg.train, total_steps)
    forward, optimizer = accelerator.prepare(SequenceLogprobs(model), optimizer)
    step, _, logger = engine.start_run(accelerator, cfg, {"model": model}, {"model": optimizer}, {"model": scheduler})

    def run_eval(at_step):
        metrics = evaluate(cfg, model, eval_elements, weights, pad_id, accelerator)
        logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=at_step)
        return metrics

    eval_before = run_eval(0) if eval_elements and step == 0 else None

    forward.train()
    bar = engine.progress(accelerator, total_steps, initial=step, desc=stage, enabled=cfg.log.progress)
    world = accelerator.num_processes
    start, units_seen, last_log = time.time(), 0, {}
    epoch = step // steps_per_epoch
    batches = _micro_batches(train_loader, epoch, skip=(step % steps_per_epoch) * accum, rank=accelerator.process_index,
                             world=world)
    while step < total_steps:
        group = []
        for _ in range(accum):
            mb = next(batches, None)
            if mb is None:  # epoch ended: next epoch's order
                epoch += 1
                batches = _micro_batches(train_loader, epoch, skip=0, rank=accelerator.process_index, world=world)
                mb = next(batches)
            group.append(mb)
        # DPO: every prompt of the global batch weighs the same; KTO: every answer.
        local_units = torch.tensor(float(sum(len(els) for els in group)), device=accelerator.device)
        global_units = accelerator.reduce(local_units.clone(), "sum").clamp(min=1)
        loss_total, sums = torch.zeros((), device=accelerator.device), {}
        for i, els in enumerate(group):
            mb = {k: v.to(accelerator.device) for k, v in collate(els, pad_id, cfg.data.max_length, packing, attn).items()}
            with nullcontext() if i == len(group) - 1 else accelerator.no_sync(forward):
                logps = _forward(forward, mb).float()
                terms = _terms(cfg, logps, mb, els, weights, accelerator)
                # DDP averages gradients over processes; multiply back so the result is the global mean.
                accelerator.backward(terms.loss_sum * world / global_units)
            loss_total += terms.loss_sum.detach()
            for k, v in terms.stats.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float, device=accelerator.device).detach()
            units_seen += len(els)
        train_loss = accelerator.reduce(loss_total, "sum") / global_units
        engine.check_finite(train_loss, "training loss", step, cfg.output_dir)
        grad_norm = engine.optimizer_step(accelerator, forward.parameters(), optimizer, scheduler,
                                          cfg.train.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            keys = sorted(sums)
            reduced = accelerator.reduce(torch.stack([sums[k] for k in keys]), "sum").tolist()
            elapsed = time.time() - start
            unit = "answers" if stage == "kto" else "prompts"
            last_log = {"train/loss": train_loss.item(), "train/grad_norm": float(grad_norm),
                        "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch,
                        f"train/{unit}_per_second": units_seen * world / max(elapsed, 1e-9),
                        **{f"train/{k}": v for k, v in _finish(dict(zip(keys, reduced)), stage == "kto").items()}}
            logger.log(last_log, step=step)
            bar.set_postfix(loss=f"{train_loss.item():.4f}")
        if eval_elements and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            engine.save_checkpoint(accelerator, cfg.output_dir, step, {"model": model}, {"model": optimizer},
                                   {"model": scheduler}, {"epoch": epoch}, keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    eval_after = run_eval(step) if eval_elements else None
    accelerator.wait_for_everyone()
    final_dir = os.path.join(cfg.output_dir, "final")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(forward).model, tokenizer, final_dir, cfg.model)
    summary = {
        "stage": stage, "steps": step, "train_loss": last_log.get("train/loss"),
        "train": {k[len("train/"):]: v for k, v in last_log.items()}, "eval_before": eval_before,
        "eval_after": eval_after, "runtime_seconds": round(runtime, 2),
        "reference_seconds": round(ref_seconds, 2), "reference": settings.reference or (
            "policy with the adapter off" if is_peft(model) else "policy before training"),
        "trainable_parameters": trainable, "total_parameters": total, "num_processes": world, "rows": row_accounts,
        "data": data_stats,
        "final_dir": final_dir,
    }
    if stage == "kto":
        summary["weights"] = {"desirable": weights[0], "undesirable": weights[1]}
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    engine.end_training(accelerator)
    return summary


def _micro_batches(loader, epoch: int, skip: int, rank: int, world: int):
    """This process's micro-batches of one epoch: every world-th batch of the seeded order (elements stay
    Python objects, so the loader is sharded here rather than by accelerate)."""
    loader.sampler.set_epoch(epoch)
    for i, batch in enumerate(loader):
        if i >= skip * world and i % world == rank:
            yield batch


def _save_reference(path: str, ref_logps: list[list[float]]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({"logps": torch.tensor([x for r in ref_logps for x in r], dtype=torch.float),
               "counts": torch.tensor([len(r) for r in ref_logps], dtype=torch.long)}, path)


def _load_reference(path: str, elements: list[Element]) -> list[list[float]]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise engine.TrainingError(f"{path}: missing; --resume needs the reference log-probs saved at the start")
    saved = load_file(path)
    counts = saved["counts"].tolist()
    if counts != [len(el.sequences) for el in elements]:
        raise engine.TrainingError(f"{path}: reference log-probs were computed for other data "
                                   f"({len(counts)} elements, now {len(elements)}); start a fresh output_dir")
    flat, out = saved["logps"].tolist(), []
    for n in counts:
        out.append(flat[:n])
        flat = flat[n:]
    return out
