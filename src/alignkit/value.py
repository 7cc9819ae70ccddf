"""PPO's value model: per-token values from a score head, started from the reward model (InstructGPT).

A separate sequence-classification model (full, or with LoRA), or in shared-base mode a
"value" adapter + head on the policy's own frozen base (``alignkit.adapters``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from alignkit.adapters import add_value_adapter, adapter_base, is_adapter_dir
from alignkit.config import ConfigError
from alignkit.modeling import (
    add_lora,
    backbone_and_head,
    disable_dropout,
    head_outputs,
    load_model,
    merge_lora,
    resolve_path,
    same_vocab,
)
from alignkit.rewards import read_model_head, reward_model_info


class ValueModel(torch.nn.Module):
    """Per-token values (B, L): a one-output score head read at every token.

    ``model`` is a sequence-classification model (saved as an ordinary HF folder, so
    ``AutoModelForSequenceClassification.from_pretrained(output_dir/final_value)`` loads it) or,
    in shared-base mode, an ``adapters.AdapterHead`` on the policy's own base.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return head_outputs(self.model, input_ids, attention_mask, position_ids).squeeze(-1).float()


def value_head_from_reward(old: torch.nn.Linear, info: dict | None, weights_override=None) -> torch.nn.Linear:
    """One-output head equal to the reward head ``old``'s aspect combination: sum_k w_k / scale_k * W_k.

    InstructGPT initialises the value function from the reward model. The offset (and a
    head bias) is dropped: GAE only needs values up to learning.
    """
    weight = old.weight.detach().float()
    if info is not None:
        w = torch.tensor(weights_override or info["weights"], dtype=torch.float32)
        s = torch.tensor(info["scale"], dtype=torch.float32)
        weight = ((w / s)[:, None] * weight).sum(0, keepdim=True)
    elif weight.shape[0] != 1:
        w = torch.tensor(weights_override or [1.0] * weight.shape[0], dtype=torch.float32)
        weight = (w[:, None] * weight).sum(0, keepdim=True)
    head = torch.nn.Linear(weight.shape[1], 1, bias=False, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
    return head


def load_value_model(cfg, tokenizer, policy_path: str, reward, policy=None) -> tuple[ValueModel, str]:
    """PPO's value model (``cfg`` a PPOConfig) -> (ValueModel, where it started from).

    From the reward model (InstructGPT) when one shares the policy's tokenizer, else the policy,
    or a folder; in shared-base mode an adapter on the policy's base (``adapters.add_value_adapter``).
    """
    choice = cfg.ppo.value_init
    rm = None
    if choice in ("auto", "reward"):
        # A value model reads the policy's tokens, so only a reward model with the same vocabulary fits.
        rm = next((m.cfg for m in reward.models if same_vocab(m.tokenizer, tokenizer)
                   and backbone_and_head(m.model) is not None), None)
        if rm is None and choice == "reward" and not cfg.ppo.shared_base:
            raise ConfigError("ppo.value_init=reward: no reward-model source shares the policy's tokenizer "
                              "(use ppo.value_init=policy)")
    if rm is not None:
        src, note = rm.name_or_path, f"reward model {rm.name_or_path}"
        info = reward_model_info(src)
        n_labels = read_model_head(resolve_path(src), rm.trust_remote_code, src)[1]
        weights = list(rm.aspect_weights) or None
    else:
        src = policy_path if choice in ("auto", "reward", "policy") else choice
        note = "policy" if src == policy_path else src
        info, n_labels, weights = None, 1, None
    if cfg.ppo.shared_base:
        if choice not in ("auto", "reward", "policy"):
            raise ConfigError(f"ppo.value_init={choice} with ppo.shared_base: the value model is an adapter on the "
                              "policy's base, not a separate folder; use auto, reward or policy")
        shared_rm = next((m for m in reward.models if m.shared), None) if choice in ("auto", "reward") else None
        if shared_rm is None and choice == "reward":
            raise ConfigError("ppo.value_init=reward with ppo.shared_base: the reward model must be a LoRA adapter "
                              "of the policy's base (train it with model.lora.enabled and use its final_adapter/), "
                              "or set ppo.value_init=policy")
        note = (f"copy of reward adapter {shared_rm.name} (shared base)" if shared_rm is not None
                else "fresh value adapter, zero head (shared base)")
        head = value_head_from_reward(shared_rm.model.head, shared_rm.info) if shared_rm is not None else None
        return ValueModel(add_value_adapter(policy, cfg.model.lora, shared_rm.model if shared_rm else None, head)), note
    vcfg = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False))
    adapter = is_adapter_dir(resolve_path(src))
    model = load_model(vcfg, task="reward", num_labels=n_labels, pad_token_id=tokenizer.pad_token_id,
                       trainable=False, path=adapter_base(resolve_path(src)) if adapter else src)
    if adapter:  # a LoRA reward model: its adapter and score head merged into a plain copy of its base
        from peft import PeftModel

        model = merge_lora(PeftModel.from_pretrained(model, resolve_path(src)))
    if n_labels != 1 or info is not None:
        model.score = value_head_from_reward(backbone_and_head(model)[1], info, weights)
    model.config.num_labels = 1
    if hasattr(model.config, "alignkit_reward"):
        del model.config.alignkit_reward  # the saved value model must not pass for a reward model
    model.config.alignkit_value = {"initialised_from": note}
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.model, task="reward")
    else:
        model.requires_grad_(True)
    disable_dropout(model)
    return ValueModel(model), note


def save_value(model, tokenizer, value_dir: str, state_dict: Optional[dict] = None) -> None:
    """final_value/: the value model's sequence-classification model (or its LoRA adapter); ``state_dict``:
    its full weights gathered from the shards."""
    os.makedirs(value_dir, exist_ok=True)
    model.save_pretrained(value_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(value_dir)
