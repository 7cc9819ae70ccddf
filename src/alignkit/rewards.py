"""Reward sources for PPO behind one interface: ``reward(prompts, responses) -> scores (B,)``.

    from alignkit.rewards import RewardSourceConfig, build_reward
    reward = build_reward([RewardSourceConfig(name_or_path="runs/rm-tiny/final")])
    scores = reward(["review the pizza"], ["the pizza was great ."])

A source is one of
* ``builtin:gold``: the built-in task's true reward (``alignkit.builtin.gold_reward``);
* ``package.module:function``: any Python ``f(prompts, responses) -> list[float]``;
* a folder or Hub id of a sequence-classification reward model. A model saved by
  alignkit carries ``"alignkit_reward": {aspects, weights, offset, scale}`` in its
  config.json, and its score is ``sum_k weights_k * (raw_k - offset_k) / scale_k``;
  any other HF reward model is read raw (one output, or several with ``aspects``).

Reward models read *text*: the prompt goes through the reward model's own chat template
and the response is re-tokenized with the reward model's tokenizer, so the reward model
and the policy need not share a vocabulary. Several sources are summed with weights.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from alignkit.config import ConfigError
from alignkit.modeling import (
    DTYPES,
    AdapterHead,
    ModelLoadError,
    adapter_base,
    attach_adapter_head,
    is_adapter_dir,
    is_peft,
    load_adapter_classifier,
    read_adapter_head,
    resolve_path,
    same_model_path,
)

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

    def __post_init__(self):
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
        from alignkit.builtin import gold_reward

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


def score_head(model):
    """(backbone, head) of a decoder-style sequence-classification model, or None for others.

    Decoder RMs (Llama, Qwen, GPT-2 ...) have a ``score`` linear head on every token; we
    read it at the last *attended* token ourselves, so a tokenizer whose pad token equals
    its EOS (HF pools at the last non-pad id) still gets the EOS position.
    """
    hf = model.get_base_model() if is_peft(model) else model
    backbone = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
    head = getattr(hf, "score", None)
    if backbone is None or head is None:
        return None
    return backbone, head


def last_token_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Scores (B, num_labels) at the last attended token of right-padded inputs."""
    last = attention_mask.sum(-1) - 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if isinstance(model, AdapterHead):  # an adapter on a shared base (low-memory PPO)
        return model(input_ids, attention_mask, position_ids)[torch.arange(len(last)), last]
    parts = score_head(model)
    if parts is None:  # encoder RMs pool their own way (e.g. the first token)
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    backbone, head = parts
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return head(hidden[torch.arange(len(last)), last])


def read_model_head(path: str, cfg: RewardSourceConfig, where: str) -> tuple[dict | None, int]:
    """(``alignkit_reward`` block or None, number of outputs) of a reward model folder or LoRA adapter folder.

    An adapter folder saved by alignkit carries ``alignkit_reward.json``; any other peft
    sequence-classification adapter is read raw, its outputs counted from its score head.
    """
    from transformers import AutoConfig

    if is_adapter_dir(path):
        info_path = os.path.join(path, "alignkit_reward.json")
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as f:
                head = read_reward_head({"alignkit_reward": json.load(f)}, where)
            return head, len(head["aspects"])
        _, score = read_adapter_head(path)
        return None, score["weight"].shape[0]
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"reward model {where}: cannot read its config ({e})") from None
    return read_reward_head(hf_config.to_dict(), where), hf_config.num_labels


class SharedBase:
    """The policy's peft model and its base folder, offered to reward sources that are adapters of that base."""

    def __init__(self, model, base_path: str):
        self.model, self.base_path = model, base_path

    def new_name(self, stem: str) -> str:
        names = set(self.model.peft_config)
        return next(n for n in (stem if i == 0 else f"{stem}_{i}" for i in range(len(names) + 1)) if n not in names)


class ModelReward:
    """A sequence-classification reward model read on re-tokenized text.

    raw (B, A) -> normalised (raw - offset) / scale -> weighted sum over aspects (B,).
    """

    def __init__(self, cfg: RewardSourceConfig, device="cpu", batch_size: int = 32, model=None, tokenizer=None,
                 shared_base=None):
        from transformers import AutoModelForSequenceClassification

        from alignkit.modeling import DEFAULT_CHAT_TEMPLATE

        where = cfg.name_or_path
        self.name = where
        path = resolve_path(cfg.name_or_path)
        adapter = is_adapter_dir(path)
        head, n_out = read_model_head(path, cfg, where)
        if head is not None:
            if len(head["aspects"]) != n_out:
                raise ModelLoadError(f"reward model {where}: {n_out} outputs but alignkit_reward lists "
                                     f"{len(head['aspects'])} aspects {head['aspects']}")
            aspects = list(head["aspects"])
            weights, offset, scale = list(head["weights"]), list(head["offset"]), list(head["scale"])
        else:
            if not cfg.aspects and n_out != 1:
                raise ModelLoadError(f"reward model {where}: {n_out} outputs but reward.sources.aspects is empty; "
                                     "name the outputs (and set aspect_weights) to combine them")
            aspects = list(cfg.aspects) or ["score"]
            weights, offset, scale = [1.0] * n_out, [0.0] * n_out, [1.0] * n_out
        if cfg.aspects and (len(cfg.aspects) != n_out or (head is not None and list(cfg.aspects) != aspects)):
            raise ModelLoadError(f"reward model {where}: has {n_out} output(s)"
                                 f"{' ' + str(aspects) if head is not None else ''} but reward.sources.aspects "
                                 f"is {list(cfg.aspects)}")
        if cfg.aspect_weights:
            if len(cfg.aspect_weights) != n_out:
                raise ModelLoadError(f"reward model {where}: {n_out} output(s) but reward.sources.aspect_weights "
                                     f"has {len(cfg.aspect_weights)} entries")
            weights = list(cfg.aspect_weights)
        self.aspects = aspects
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.offset = torch.tensor(offset, dtype=torch.float32)
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.path, self.cfg, self.device, self.batch_size = path, cfg, device, batch_size

        if tokenizer is None:
            from transformers import AutoTokenizer

            tok_path = resolve_path(cfg.tokenizer or cfg.name_or_path)
            if adapter and not cfg.tokenizer and not os.path.exists(os.path.join(path, "tokenizer_config.json")):
                tok_path = adapter_base(path)  # an adapter saved without its tokenizer: the base's
            tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.trust_remote_code)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if not tokenizer.chat_template:
                tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        self.tokenizer = tokenizer
        # shared_base: a peft model whose base this adapter was trained on; the reward model then is
        # one more adapter on that base (no second copy of the weights).
        self.shared = False
        if model is None and adapter and shared_base is not None and same_model_path(adapter_base(path),
                                                                                    shared_base.base_path):
            model = attach_adapter_head(shared_base.model, path, shared_base.new_name("reward"))
            self.shared = True
        if model is None:
            try:
                if adapter:
                    model = load_adapter_classifier(path, n_out, tokenizer.pad_token_id, cfg.dtype,
                                                    cfg.trust_remote_code)
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(
                        path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"reward model {where}: cannot load it ({e})") from None
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            model.requires_grad_(False).eval().to(device)
        self.model = model

    def encode(self, prompt, response: str, ended: bool = True) -> list[int]:
        """Prompt through the RM's chat template + response (+ EOS if the response ended)."""
        from alignkit.tokenization import encode_prompt

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = encode_prompt(self.tokenizer, messages)
        ids += self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if ended and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids[-self.cfg.max_length:]

    @torch.no_grad()
    def raw_scores(self, prompts, responses, ended=None) -> torch.Tensor:
        """Raw model outputs (B, A)."""
        ended = [True] * len(responses) if ended is None else list(ended)
        out = []
        for i in range(0, len(responses), self.batch_size):
            ids = [self.encode(p, r, e) for p, r, e in zip(prompts[i:i + self.batch_size],
                                                          responses[i:i + self.batch_size],
                                                          ended[i:i + self.batch_size])]
            length = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
            for b, x in enumerate(ids):
                input_ids[b, :len(x)] = torch.tensor(x)
                attention_mask[b, :len(x)] = 1
            scores = last_token_scores(self.model, input_ids.to(self.device), attention_mask.to(self.device))
            out.append(scores.float().cpu())
        raw = torch.cat(out)
        if raw.shape[-1] != len(self.aspects):
            raise ModelLoadError(f"reward model {self.name}: returned {raw.shape[-1]} outputs for "
                                 f"aspects {self.aspects}")
        return raw

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.offset) / self.scale

    def __call__(self, prompts, responses, ended=None) -> torch.Tensor:
        return (self.normalise(self.raw_scores(prompts, responses, ended)) * self.weights).sum(-1)


class WeightedReward:
    """Weighted sum of several sources; ``components`` keeps each source's last scores for logging."""

    def __init__(self, sources: list, weights: list[float]):
        self.sources, self.weights = sources, weights
        self.components: dict[str, torch.Tensor] = {}

    def __call__(self, prompts, responses, ended=None) -> torch.Tensor:
        total = torch.zeros(len(responses))
        self.components = {}
        for src, w in zip(self.sources, self.weights):
            s = src(prompts, responses, ended) if isinstance(src, ModelReward) else src(prompts, responses)
            if s.shape != total.shape:
                raise ModelLoadError(f"reward source {src.name}: {tuple(s.shape)} scores for {len(responses)} responses")
            self.components[src.name] = s
            total = total + w * s
        return total

    @property
    def models(self) -> list[ModelReward]:
        return [s for s in self.sources if isinstance(s, ModelReward)]


def is_function_spec(spec: str) -> bool:
    if spec.startswith("builtin:"):
        return spec == "builtin:gold"
    return bool(_FUNCTION_SPEC.match(spec)) and not os.path.exists(spec)


def build_reward(sources: list[RewardSourceConfig], device="cpu", batch_size: int = 32,
                 shared_base: SharedBase | None = None) -> WeightedReward:
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
        built.append(load_function(cfg.name_or_path) if is_function_spec(cfg.name_or_path)
                     else ModelReward(cfg, device=device, batch_size=batch_size, shared_base=shared_base))
    return WeightedReward(built, [c.weight for c in sources])


def reward_model_info(path: str) -> dict | None:
    """The ``alignkit_reward`` block of a saved reward model folder, or None."""
    return read_model_head(resolve_path(path), RewardSourceConfig(name_or_path=path), path)[0]
