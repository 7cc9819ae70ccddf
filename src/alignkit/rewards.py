"""Reading rewards: the one module that turns (prompt, response) into a score, for every stage.

Reward sources for PPO behind one interface: ``reward(prompts, responses) -> scores (B,)``.

    from alignkit.rewards import RewardSourceConfig, build_reward
    reward = build_reward([RewardSourceConfig(name_or_path="runs/rm-tiny/final")])
    scores = reward(["review the pizza"], ["the pizza was great ."])

A source is one of
* ``builtin:gold``: the built-in tasks' true reward (``alignkit.tasks.gold_reward``: each prompt by its own task);
* ``package.module:function``: any Python ``f(prompts, responses) -> list[float]``;
* a folder or Hub id of a sequence-classification reward model. A model saved by
  alignkit carries ``"alignkit_reward": {aspects, weights, offset, scale}`` in its
  config.json, and its score is ``sum_k weights_k * (raw_k - offset_k) / scale_k``;
  any other HF reward model is read raw (one output, or several with ``aspects``);
* an ensemble of such reward models (``members``, same aspects and tokenizer), read as one
  conservative reward: mean - lambda * std over members, or their minimum (Coste et al. 2023).

Reward models read *text*: the prompt goes through the reward model's own chat template
and the response is re-tokenized with the reward model's tokenizer, so the reward model
and the policy need not share a vocabulary. Several sources are summed with weights.

Every path that reads a reward model's score (reward-model training, its evaluation and
normalisation, PPO's reward standalone or on a shared base, ``rm-eval``) encodes text with
:func:`encode_for_reward` and pools with :func:`read_position` / :func:`reward_scores`:
the score of the rightmost non-pad token, exactly as ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional

import torch

from alignkit.config import ConfigError
from alignkit.adapters import (
    adapter_base,
    attach_adapter_head,
    is_adapter_dir,
    load_adapter_classifier,
    read_adapter_head,
)
from alignkit.modeling import DTYPES, ModelLoadError, backbone_and_head, head_outputs, resolve_path, same_vocab
from alignkit.tokenization import encode_answer, encode_prompt, right_pad

ENSEMBLE_COMBINE = ("mean_minus_std", "min", "mean")
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class RewardSourceConfig:
    # builtin:gold, package.module:function, or a reward model (folder or Hub id).
    name_or_path: str = "builtin:gold"
    # This source's weight in the summed reward.
    weight: float = 1.0
    # Expected output names of a reward model, checked against the model (empty: take the model's
    # own alignkit_reward aspects, or require a single output).
    aspects: List[str] = field(default_factory=list)
    # Per-aspect weights overriding the ones stored with the model (empty: stored, or all 1).
    aspect_weights: List[float] = field(default_factory=list)
    # Tokenizer location when it differs from the model's.
    tokenizer: Optional[str] = None
    # Longest prompt + response the reward model reads; longer inputs keep their end.
    max_length: int = 512
    dtype: str = "float32"
    trust_remote_code: bool = False
    # A reward-model ensemble read as this one source (Coste et al. 2023): these folders, all with the
    # same aspects and tokenizer (e.g. one reward model trained with k seeds); name_or_path only names
    # it then. Each member's normalised reward is combined conservatively, per response:
    members: List[str] = field(default_factory=list)
    # mean_minus_std: mean - uncertainty_coef * std over members (uncertainty-weighted optimisation);
    # min: the worst member (worst-case optimisation); mean: plain average.
    combine: str = "mean_minus_std"
    uncertainty_coef: float = 1.0

    def __post_init__(self):
        if self.members and len(self.members) < 2:
            raise ConfigError(f"reward.sources.members: an ensemble needs at least 2 reward models, got {self.members}")
        if self.combine not in ENSEMBLE_COMBINE:
            raise ConfigError(f"reward.sources.combine: must be one of {list(ENSEMBLE_COMBINE)}, got {self.combine!r}")
        if self.uncertainty_coef < 0:
            raise ConfigError(f"reward.sources.uncertainty_coef: must be >= 0, got {self.uncertainty_coef}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"reward.sources.dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.aspect_weights and self.aspects and len(self.aspect_weights) != len(self.aspects):
            raise ConfigError(f"reward.sources.aspect_weights: {len(self.aspect_weights)} weights for "
                              f"{len(self.aspects)} aspects {self.aspects}")


class FunctionReward:
    """A Python function ``f(prompts, responses) -> list[float]`` as a reward source."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts, responses) -> torch.Tensor:
        scores = self.fn(list(prompts), list(responses))
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
        if scores.numel() != len(responses):
            raise ModelLoadError(f"reward function {self.name} returned {scores.numel()} scores "
                                 f"for {len(responses)} responses")
        return scores


def load_function(spec: str) -> FunctionReward:
    if spec == "builtin:gold":
        from alignkit.tasks import gold_reward

        return FunctionReward(gold_reward, spec)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"reward function {spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise ModelLoadError(f"reward function {spec}: not callable")
    return FunctionReward(fn, spec)


def read_reward_head(config: dict, where: str) -> dict | None:
    """The ``alignkit_reward`` block of a reward model's config, checked for consistent lengths."""
    head = config.get("alignkit_reward")
    if head is None:
        return None
    n = len(head.get("aspects", []))
    for key in ("weights", "offset", "scale"):
        if len(head.get(key, [])) != n:
            raise ModelLoadError(f"{where}: alignkit_reward.{key} has {len(head.get(key, []))} entries "
                                 f"for {n} aspects {head.get('aspects')}")
    if any(s == 0 for s in head["scale"]):
        raise ModelLoadError(f"{where}: alignkit_reward.scale contains 0")
    return head


def read_model_head(path: str, trust_remote_code: bool = False, where: str | None = None) -> tuple[dict | None, int]:
    """(``alignkit_reward`` block or None, number of outputs) of a reward model folder or LoRA adapter folder.

    An adapter folder saved by alignkit carries ``alignkit_reward.json``; any other peft
    sequence-classification adapter is read raw, its outputs counted from its score head.
    """
    from transformers import AutoConfig

    where = where or path
    if is_adapter_dir(path):
        info_path = os.path.join(path, "alignkit_reward.json")
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as f:
                head = read_reward_head({"alignkit_reward": json.load(f)}, where)
            return head, len(head["aspects"])
        _, score = read_adapter_head(path)
        return None, score["weight"].shape[0]
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"reward model {where}: cannot read its config ({e})") from None
    return read_reward_head(hf_config.to_dict(), where), hf_config.num_labels


# ----------------------------------------------------------------------------- reading a reward model


def read_position(seq: list[int], pad_token_id: int | None) -> int:
    """Where a sequence's score is read: its rightmost token that is not ``pad_token_id``.

    This is ``AutoModelForSequenceClassification``'s pooling, so a saved reward model gives the
    same scores there. It is the answer's end token when the tokenizer has a pad token of its
    own, and the token before it when pad = EOS (GPT-2, Llama 3, Mistral ...). 0 if every token is pad.
    """
    if pad_token_id is None:
        return len(seq) - 1
    for k in range(len(seq) - 1, -1, -1):
        if seq[k] != pad_token_id:
            return k
    return 0


def read_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """:func:`read_position` for a right-padded batch: (B, L) -> (B,) indices."""
    keep = attention_mask.bool()
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (idx * keep).argmax(-1)


def reward_scores(model, input_ids, attention_mask, pad_token_id: int | None) -> torch.Tensor:
    """(B, outputs) scores of right-padded sequences, read at :func:`read_positions`.

    The one pooling rule of every path that reads a reward model (training, evaluation,
    normalisation, PPO standalone and on a shared base, ``rm-eval``). Encoder models, which
    pool their own way (e.g. the first token), are read through their own forward.
    """
    if not hasattr(model, "hidden_states") and backbone_and_head(model) is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    read = read_positions(input_ids, attention_mask, pad_token_id)
    flat = torch.arange(len(read), device=read.device) * input_ids.shape[1] + read
    return head_outputs(model, input_ids, attention_mask, position_ids, read_index=flat)


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_token_id: int | None, batch_size: int = 32,
                    device=None) -> torch.Tensor:
    """Raw scores (N, outputs), float32 on CPU, of token-id sequences (prompt + answer).

    Sequences are sorted by length so batches carry little padding; the order is restored.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = next(iter(model.parameters())).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = right_pad([sequences[i] for i in idx], pad_token_id)
        scores = reward_scores(model, input_ids.to(device), attention_mask.to(device), pad_token_id).float().cpu()
        for b, i in enumerate(idx):
            out[i] = scores[b]
    model.train(was_training)
    if not out:
        head = getattr(model, "head", None)
        return torch.zeros((0, head.out_features if head is not None else model.config.num_labels))
    return torch.stack(out)


def score_texts(model, tokenizer, prompts, responses, ended=None, batch_size: int = 32) -> torch.Tensor:
    """Raw scores (N, outputs) of prompt/response texts: :func:`encode_for_reward` + :func:`score_sequences`."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    ended = [True] * len(responses) if ended is None else list(ended)
    seqs = [encode_for_reward(tokenizer, p, r, e) for p, r, e in zip(prompts, responses, ended)]
    return score_sequences(model, seqs, reward_pad_id(model, tokenizer), batch_size)


def encode_for_reward(tokenizer, prompt, response: str, ended: bool = True, max_length: int | None = None) -> list[int]:
    """prompt (text or conversation) + response -> the token ids a reward model scores.

    Exactly what reward-model training encodes: the prompt through the chat template with the
    generation prompt, then the answer and its end token (left off for a response that never
    ended). Longer than ``max_length``: the end is kept.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    answer = encode_answer(tokenizer, response)
    ids = encode_prompt(tokenizer, messages) + (answer if ended else answer[:-1])
    return ids[-max_length:] if max_length else ids


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
    """The reward head of a model saved without ``alignkit_reward``: raw outputs, weight 1 each."""
    return {"aspects": [f"label_{i}" for i in range(num_labels)] if num_labels > 1 else ["overall"],
            "weights": [1.0] * num_labels, "offset": [0.0] * num_labels, "scale": [1.0] * num_labels}


def load_reward_tokenizer(path: str, tokenizer_path: str | None = None, trust_remote_code: bool = False):
    """The tokenizer saved with a reward model (an adapter saved without one: its base's), loaded and checked
    like every tokenizer (``modeling.load_tokenizer``: pad = EOS when it has none, default chat template)."""
    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer

    tok_path = tokenizer_path or path
    if not tokenizer_path and is_adapter_dir(path) and not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        tok_path = adapter_base(path)
    return load_tokenizer(ModelConfig(name_or_path=tok_path, trust_remote_code=trust_remote_code))


def load_reward_model(path: str, dtype: str = "float32", device=None, tokenizer_path: str | None = None,
                      trust_remote_code: bool = False):
    """A saved reward model -> (model in eval mode, tokenizer, info).

    ``path`` is a sequence-classification folder (``output_dir/final``; without
    ``alignkit_reward`` in its config offsets are 0, scales and weights 1) or a LoRA adapter folder
    (``output_dir/final_adapter``), applied to a fresh copy of its base.
    """
    from transformers import AutoModelForSequenceClassification

    where = path
    path = resolve_path(path)
    head, n_out = read_model_head(path, trust_remote_code, where)
    if head is not None and len(head["aspects"]) != n_out:
        raise ModelLoadError(f"reward model {where}: {n_out} outputs but alignkit_reward lists "
                             f"{len(head['aspects'])} aspects {head['aspects']}")
    tokenizer = load_reward_tokenizer(path, tokenizer_path, trust_remote_code)
    try:
        if is_adapter_dir(path):
            model = load_adapter_classifier(path, n_out, tokenizer.pad_token_id, dtype, trust_remote_code)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype],
                                                                       trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"reward model {where}: cannot load it ({e})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    info = head or default_info(n_out)
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return model, tokenizer, info


def reward_pad_id(model, tokenizer) -> int | None:
    """The pad id a model's scores are read against: its config's (what HF pools with), else the tokenizer's."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None) if config is not None else None
    return pad if pad is not None else tokenizer.pad_token_id


class ModelReward:
    """A sequence-classification reward model read on re-tokenized text.

    raw (B, A) -> normalised (raw - offset) / scale -> weighted sum over aspects (B,).
    With ``shared_base``, a LoRA adapter folder of that base is attached to it as a frozen
    adapter (no second copy of the weights); otherwise the model is loaded on its own.
    """

    def __init__(self, cfg: RewardSourceConfig, device="cpu", batch_size: int = 32, shared_base=None):
        where = cfg.name_or_path
        self.name, self.cfg, self.device, self.batch_size = where, cfg, device, batch_size
        self.path = path = resolve_path(cfg.name_or_path)
        head, n_out = read_model_head(path, cfg.trust_remote_code, where)
        self.shared = shared_base is not None and shared_base.accepts(path)
        if self.shared:
            self.tokenizer = load_reward_tokenizer(path, cfg.tokenizer, cfg.trust_remote_code)
            self.model = attach_adapter_head(shared_base.model, path, shared_base.new_name("reward"))
        else:
            self.model, self.tokenizer, _ = load_reward_model(path, cfg.dtype, device, cfg.tokenizer,
                                                              cfg.trust_remote_code)
        if head is None and not cfg.aspects and n_out != 1:
            raise ModelLoadError(f"reward model {where}: {n_out} outputs but reward.sources.aspects is empty; "
                                 "name the outputs (and set aspect_weights) to combine them")
        info = head or {**default_info(n_out), "aspects": list(cfg.aspects) or (["score"] if n_out == 1 else [])}
        if cfg.aspects and (len(cfg.aspects) != n_out or (head is not None and list(cfg.aspects) != info["aspects"])):
            raise ModelLoadError(f"reward model {where}: has {n_out} output(s)"
                                 f"{' ' + str(info['aspects']) if head is not None else ''} but reward.sources.aspects "
                                 f"is {list(cfg.aspects)}")
        if cfg.aspect_weights:
            if len(cfg.aspect_weights) != n_out:
                raise ModelLoadError(f"reward model {where}: {n_out} output(s) but reward.sources.aspect_weights "
                                     f"has {len(cfg.aspect_weights)} entries")
            info = {**info, "weights": list(cfg.aspect_weights)}
        self.info = info
        self.aspects = list(info["aspects"])
        self.weights = torch.tensor(info["weights"], dtype=torch.float32)
        self.scale = torch.tensor(info["scale"], dtype=torch.float32)
        self.pad_token_id = self.tokenizer.pad_token_id if self.shared else reward_pad_id(self.model, self.tokenizer)

    def encode(self, prompt, response: str, ended: bool = True) -> list[int]:
        return encode_for_reward(self.tokenizer, prompt, response, ended, self.cfg.max_length)

    @torch.no_grad()
    def raw_scores(self, prompts, responses, ended=None) -> torch.Tensor:
        """Raw model outputs (B, A)."""
        ended = [True] * len(responses) if ended is None else list(ended)
        seqs = [self.encode(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        raw = score_sequences(self.model, seqs, self.pad_token_id, self.batch_size, device=self.device)
        if raw.shape[-1] != len(self.aspects):
            raise ModelLoadError(f"reward model {self.name}: returned {raw.shape[-1]} outputs for "
                                 f"aspects {self.aspects}")
        return raw

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return normalize(raw, self.info)

    def __call__(self, prompts, responses, ended=None) -> torch.Tensor:
        return combined_reward(self.raw_scores(prompts, responses, ended), self.info)


def combine_ensemble(scores: torch.Tensor, combine: str, coef: float = 1.0) -> torch.Tensor:
    """(members, N) rewards -> (N,) conservative reward (Coste et al. 2023).

    mean_minus_std: mean - coef * std (population std over members); min: the lowest member; mean.
    """
    if combine == "mean":
        return scores.mean(0)
    if combine == "min":
        return scores.min(0).values
    if combine == "mean_minus_std":
        return scores.mean(0) - coef * scores.std(0, unbiased=False)
    raise ConfigError(f"reward.sources.combine: must be one of {list(ENSEMBLE_COMBINE)}, got {combine!r}")


class EnsembleReward:
    """k reward models with the same aspects and tokenizer, read as one conservative reward.

    Each member gives its own normalised, aspect-weighted reward (``ModelReward``); the ensemble
    combines them per response with ``combine_ensemble``. ``spread`` keeps the last std over members.
    """

    def __init__(self, cfg: RewardSourceConfig, members: list["ModelReward"]):
        self.name, self.cfg, self.members = cfg.name_or_path, cfg, members
        first = members[0]
        for m in members[1:]:
            if m.aspects != first.aspects:
                raise ConfigError(f"reward.sources.members: the ensemble's members disagree on aspects: "
                                  f"{first.name} has {first.aspects}, {m.name} has {m.aspects}")
            if not same_vocab(m.tokenizer, first.tokenizer) or m.pad_token_id != first.pad_token_id:
                raise ConfigError(f"reward.sources.members: the ensemble's members disagree on the tokenizer: "
                                  f"{first.name} and {m.name} (an ensemble reads one tokenization of each response)")
        self.spread = torch.zeros(0)

    def __call__(self, prompts, responses, ended=None) -> torch.Tensor:
        scores = torch.stack([m(prompts, responses, ended) for m in self.members])
        self.spread = scores.std(0, unbiased=False)
        return combine_ensemble(scores, self.cfg.combine, self.cfg.uncertainty_coef)


class WeightedReward:
    """Weighted sum of several sources; ``components`` keeps each source's last scores for logging."""

    def __init__(self, sources: list, weights: list[float]):
        self.sources, self.weights = sources, weights
        self.components: dict[str, torch.Tensor] = {}

    def __call__(self, prompts, responses, ended=None) -> torch.Tensor:
        total = torch.zeros(len(responses))
        self.components = {}
        for src, w in zip(self.sources, self.weights):
            s = (src(prompts, responses, ended) if isinstance(src, (ModelReward, EnsembleReward))
                 else src(prompts, responses))
            if s.shape != total.shape:
                raise ModelLoadError(f"reward source {src.name}: {tuple(s.shape)} scores for {len(responses)} responses")
            self.components[src.name] = s
            total = total + w * s
        return total

    @property
    def models(self) -> list[ModelReward]:
        return [m for s in self.sources if isinstance(s, (ModelReward, EnsembleReward))
                for m in (s.members if isinstance(s, EnsembleReward) else [s])]


def is_function_spec(spec: str) -> bool:
    if spec.startswith("builtin:"):
        return spec == "builtin:gold"
    return bool(_FUNCTION_SPEC.match(spec)) and not os.path.exists(spec)


def build_reward(sources: list[RewardSourceConfig], device="cpu", batch_size: int = 32,
                 shared_base=None) -> WeightedReward:
    """Load every configured source; every problem is raised before training starts.

    With ``shared_base``, a reward model given as a LoRA adapter folder of that same base is
    attached to it as a frozen adapter instead of being loaded as a second network.
    """
    if not sources:
        raise ConfigError("reward.sources: at least one reward source is needed")
    built = []
    for cfg in sources:
        if cfg.name_or_path.startswith("builtin:") and cfg.name_or_path != "builtin:gold":
            if cfg.name_or_path not in ("builtin:tiny", "builtin:small"):
                raise ConfigError(f"reward.sources.name_or_path: unknown built-in {cfg.name_or_path!r} "
                                  "(builtin:gold is the built-in task's reward function)")
        if cfg.members:
            members = [ModelReward(replace(cfg, name_or_path=m, members=[]), device=device, batch_size=batch_size,
                                   shared_base=shared_base) for m in cfg.members]
            built.append(EnsembleReward(cfg, members))
            continue
        built.append(load_function(cfg.name_or_path) if is_function_spec(cfg.name_or_path)
                     else ModelReward(cfg, device=device, batch_size=batch_size, shared_base=shared_base))
    return WeightedReward(built, [c.weight for c in sources])


def reward_model_info(path: str) -> dict | None:
    """The ``alignkit_reward`` block of a saved reward model folder, or None."""
    return read_model_head(resolve_path(path), where=path)[0]
