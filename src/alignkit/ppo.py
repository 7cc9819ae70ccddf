"""PPO with a per-token KL penalty against the SFT policy (InstructGPT step 3).

    alignkit ppo --config configs/ppo/tiny.yaml
    accelerate launch scripts/train_ppo.py --config configs/ppo/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_ppo.py --config configs/ppo/tiny.yaml

From Python: ``train_ppo(load_config(PPOConfig, "configs/ppo/tiny.yaml",
["model.name_or_path=runs/sft-tiny/final", "reward.sources=[{name_or_path: runs/rm-tiny/final}]"]))``.

``train_ppo`` reads: accelerator -> tokenizer -> prompts (validated first) -> reward ->
policy, reference, value -> one loop per PPO update with five named phases:

    # 1. generate          sample responses from left-padded prompts, cut after the first EOS
    # 2. score             reward on prompt + truncated response text (missing-EOS penalty)
    # 3. log-probs/values  policy, reference (same temperature) and value per response token
    # 4. rewards + GAE     -kl_coef * KL per token + score on the last token; GAE; whitening
    # 5. PPO epochs        clipped policy + value loss over shuffled minibatches

Names: ``b_`` tensors hold the whole rollout batch of this process, ``mb_`` a minibatch
(or micro-batch). Maths come from :mod:`alignkit.losses`; references in RLHF.md
(Ziegler et al. 2019, Ouyang et al. 2022, Huang et al. 2024 "The N+ implementation details").

Memory modes: full fine-tuning keeps a frozen copy of the starting policy as the reference;
with ``model.lora.enabled`` the reference is the same network with the adapter switched off
(no second copy) and the base may be 8-/4-bit; ``ppo.shared_base`` also puts the value
model on that one frozen base (its own adapter + head) and, when the reward model is a
LoRA adapter of the same base (``alignkit rm`` with LoRA writes ``final_adapter/``), the
reward model too: one base serves policy, reference, value and reward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import resource
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from alignkit import engine
from alignkit.config import ConfigError, DataConfig, LogConfig, ModelConfig, TrainConfig
from alignkit.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from alignkit.modeling import (
    AdapterHead,
    ModelLoadError,
    adapter_base,
    adapter_tensor,
    adapters_off,
    add_lora,
    copy_adapter,
    count_parameters,
    disable_dropout,
    is_adapter_dir,
    is_peft,
    load_model,
    load_tokenizer,
    merge_lora,
    resolve_path,
    save_model,
)
from alignkit.rewards import (
    ModelReward,
    RewardSourceConfig,
    SharedBase,
    build_reward,
    read_model_head,
    reward_model_info,
    score_head,
)
from alignkit.schema import DataError, RowAccount, load_examples, prompts as prompt_view, select_rows
from alignkit.tokenization import encode_prompt, fit_length


@dataclass
class PPOSettings:
    # Prompts per process per PPO update (the rollout batch).
    rollout_batch_size: int = 64
    # Optimizer steps per PPO epoch: the rollout batch is cut into this many shuffled minibatches.
    num_minibatches: int = 2
    # Passes over each rollout batch.
    ppo_epochs: int = 4
    # Most tokens sampled per response.
    response_length: int = 32
    # Sampling temperature; log-probs of policy and reference use it too (Huang et al. 2024).
    temperature: float = 1.0
    # Per-token KL estimator in the reward: k1 (logp - ref_logp) or k3 (always >= 0, lower variance).
    kl_estimator: str = "k1"
    # Starting KL coefficient beta.
    kl_coef: float = 0.05
    # Adapt beta so the KL per response tracks kl_target (Ziegler et al. 2019); false: fixed beta.
    adaptive_kl: bool = True
    # Target KL (nats per response, of the estimator above) for the adaptive controller.
    kl_target: float = 6.0
    # Controller horizon in responses: beta moves at most 20% * batch / horizon per update.
    kl_horizon: int = 256
    # Adaptive KL only: beta never falls below this (null: no floor). Without a floor, beta keeps
    # shrinking while the KL sits under its target (early on, or once the reward model saturates),
    # so a long run loses its brake; with one, kl_target acts as a ceiling the controller enforces.
    kl_coef_min: Optional[float] = None
    # PPO clip range of the probability ratio.
    clip_range: float = 0.2
    # Clip range of the value update around the rollout values.
    clip_range_value: float = 0.2
    # Weight of the value loss in the total loss.
    vf_coef: float = 0.1
    # GAE discount and lambda (Schulman et al. 2015).
    gamma: float = 1.0
    lam: float = 0.95
    # Scale per-token rewards to unit variance before GAE (advantages are always whitened).
    whiten_rewards: bool = False
    # Added to the score of a response that never emits EOS (null: no penalty).
    missing_eos_penalty: Optional[float] = -1.0
    # Value model start: auto (the reward model when it shares the policy's tokenizer, else the
    # policy), reward, policy, or a folder.
    value_init: str = "auto"
    # Reference model folder; null: the policy's starting weights (LoRA: the adapter switched off).
    reference: Optional[str] = None
    # LoRA only: value adapter + head on the policy's frozen base (one base in memory).
    shared_base: bool = False
    # PPO-ptx (InstructGPT eq. 2): weight of the SFT loss on demonstrations mixed into each step (0: off).
    ptx_coef: float = 0.0
    # Demonstrations for PPO-ptx (same formats as SFT).
    ptx_files: List[str] = field(default_factory=list)
    # Held-out prompts sampled for evaluation (before, every train.eval_every updates, at the end).
    eval_samples: int = 128

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"ppo.kl_estimator: must be k1 or k3, got {self.kl_estimator!r}")
        if self.rollout_batch_size < 1 or self.num_minibatches < 1 or self.ppo_epochs < 1:
            raise ConfigError("ppo.rollout_batch_size, ppo.num_minibatches and ppo.ppo_epochs must be >= 1")
        if self.rollout_batch_size % self.num_minibatches:
            raise ConfigError(f"ppo.rollout_batch_size={self.rollout_batch_size} is not divisible into "
                              f"ppo.num_minibatches={self.num_minibatches} minibatches")
        if self.temperature <= 0:
            raise ConfigError("ppo.temperature: must be > 0 (log-probs are taken at the sampling temperature)")
        if self.response_length < 1:
            raise ConfigError("ppo.response_length: must be >= 1")
        if self.adaptive_kl and self.kl_target <= 0:
            raise ConfigError("ppo.kl_target: must be > 0 with ppo.adaptive_kl")
        if self.kl_coef_min is not None and not 0 <= self.kl_coef_min <= self.kl_coef:
            raise ConfigError(f"ppo.kl_coef_min: must be between 0 and ppo.kl_coef={self.kl_coef}, "
                              f"got {self.kl_coef_min}")
        if self.ptx_coef > 0 and not self.ptx_files:
            raise ConfigError("ppo.ptx_files: PPO-ptx (ppo.ptx_coef > 0) needs demonstration files")


@dataclass
class RewardConfig:
    # Reward sources, summed with their weights: builtin:gold, module:function, or reward model folders.
    sources: List[RewardSourceConfig] = field(default_factory=lambda: [RewardSourceConfig()])
    # Sequences per reward-model forward pass.
    batch_size: int = 64


@dataclass
class PPOConfig:
    # The policy to optimise (an SFT output); LoRA / 8-/4-bit settings apply to it.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Prompts: train_files for rollouts, eval_files held out; max_length caps prompt tokens.
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=["builtin:prompts"],
                                                                eval_files=["builtin:prompts:eval"], packing=False))
    # max_steps = PPO updates (else num_epochs passes over the prompts); per_device_batch_size =
    # micro-batch of the no-grad rollout passes; gradient_accumulation_steps splits each minibatch.
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    reward: RewardConfig = field(default_factory=RewardConfig)
    output_dir: str = "runs/ppo"

    def __post_init__(self):
        minibatch = self.ppo.rollout_batch_size // self.ppo.num_minibatches
        if minibatch % self.train.gradient_accumulation_steps:
            raise ConfigError(f"train.gradient_accumulation_steps={self.train.gradient_accumulation_steps} does not "
                              f"divide a minibatch of {minibatch} (ppo.rollout_batch_size="
                              f"{self.ppo.rollout_batch_size} / ppo.num_minibatches={self.ppo.num_minibatches})")
        if self.ppo.shared_base and not self.model.lora.enabled:
            raise ConfigError("ppo.shared_base: needs model.lora.enabled=true (adapters on one frozen base)")


# ----------------------------------------------------------------------------- data


@dataclass
class Prompt:
    example: object  # schema.Example: its prompt feeds the reward model as text
    ids: list  # policy tokens of the chat-templated prompt


def load_prompts(files: list[str], tokenizer, data: DataConfig, seed: int, limit: int = 0,
                 split: str = "train") -> tuple[list[Prompt], RowAccount]:
    """Prompts for rollouts, validated and tokenized, and the account of the rows read; every problem is
    reported before training."""
    examples, account = select_rows(load_examples(files, seed=seed), "ppo", data.on_unusable,
                                    data.max_unusable_fraction, split)
    examples = prompt_view(examples)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise DataError([f"{', '.join(files)}: prompt: no prompts found"])
    problems, out = [], []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.messages)
        # The answer is generated later; room is left for nothing but the prompt itself.
        fitted = fit_length(ids, [], data.max_length, data.truncation, ex.source, problems)
        if fitted is not None:
            out.append(Prompt(ex, fitted[0]))
        elif data.truncation == "drop":
            account.leave_out(ex, "prompt", f"is longer than data.max_length={data.max_length} (data.truncation=drop)")
    if problems:
        raise DataError([p.replace("answers:", "prompt:") for p in problems])
    if not out:
        raise DataError([f"{', '.join(files)}: prompt: every prompt is longer than data.max_length={data.max_length}"])
    return out, account


def prompt_batch(prompts: list[Prompt], update: int, batch_size: int, rank: int, world: int, seed: int):
    """This process's prompts for PPO update ``update``: a seeded permutation per pass over the data."""
    per_update = batch_size * world
    per_epoch = max(1, len(prompts) // per_update)
    epoch, k = divmod(update, per_epoch)
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(prompts), generator=g).tolist()
    if len(order) < per_update:  # fewer prompts than a batch: repeat them
        order = (order * math.ceil(per_update / len(order)))[:per_update]
    start = k * per_update + rank * batch_size
    return [prompts[i] for i in order[start:start + batch_size]], epoch


def left_pad(seqs: list[list[int]], pad_id: int):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    return ids, mask


# ----------------------------------------------------------------------------- models


class ValueModel(torch.nn.Module):
    """Per-token values (B, L) from a sequence-classification model: its score head read at every token.

    Saved as an ordinary HF sequence-classification model with one output, so
    ``AutoModelForSequenceClassification.from_pretrained(output_dir/final_value)`` loads it.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        parts = score_head(self.model)
        if parts is None:
            raise ModelLoadError("value model: needs a decoder-style sequence-classification model with a 'score' head")
        backbone, head = parts
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return head(hidden).squeeze(-1).float()


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


def same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def load_value_model(cfg: PPOConfig, tokenizer, policy_path: str, reward, policy=None) -> tuple[ValueModel, str]:
    """The value model: from the reward model (InstructGPT), the policy, or a folder."""
    choice = cfg.ppo.value_init
    rm = None
    if choice in ("auto", "reward"):
        # A value model reads the policy's tokens, so only a reward model with the same vocabulary fits.
        rm = next((m.cfg for m in reward.models if same_vocab(m.tokenizer, tokenizer)
                   and score_head(m.model) is not None), None)
        if rm is None and choice == "reward" and not cfg.ppo.shared_base:
            raise ConfigError("ppo.value_init=reward: no reward-model source shares the policy's tokenizer "
                              "(use ppo.value_init=policy)")
    if rm is not None:
        src, note = rm.name_or_path, f"reward model {rm.name_or_path}"
        info = reward_model_info(src)
        n_labels = read_model_head(resolve_path(src), rm, src)[1]
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
        return _shared_value(cfg, policy, shared_rm), note
    vcfg = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False))
    adapter = is_adapter_dir(resolve_path(src))
    model = load_model(vcfg, task="reward", num_labels=n_labels, pad_token_id=tokenizer.pad_token_id,
                       trainable=False, path=adapter_base(resolve_path(src)) if adapter else src)
    if adapter:  # a LoRA reward model: its adapter and score head merged into a plain copy of its base
        from peft import PeftModel

        model = merge_lora(PeftModel.from_pretrained(model, resolve_path(src)))
    if n_labels != 1 or info is not None:
        model.score = value_head_from_reward(score_head(model)[1], info, weights)
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


class SharedBaseValue(AdapterHead):
    """Values (B, L) from the policy's own frozen base through a second LoRA adapter ("value") and a head.

    The base weights exist once: the policy (adapter "default"), the reference (adapters
    off), the value (adapter "value") and, when the reward model is an adapter of the same
    base, the reward (adapter "reward", frozen) are views of one network.
    """

    adapter = "value"

    def __init__(self, peft_model, head: torch.nn.Linear):
        super().__init__(peft_model, self.adapter, head)

    def forward(self, input_ids, attention_mask, position_ids):
        return super().forward(input_ids, attention_mask, position_ids).squeeze(-1).float()


def _shared_value(cfg, policy, rm: ModelReward | None) -> SharedBaseValue:
    """Value adapter + head on the policy's own base.

    From a reward model that is itself an adapter on this base (InstructGPT: value = reward
    model): a trainable copy of its adapter, and its aspect combination as the head. Otherwise
    a fresh adapter and a zero head (values start at 0): a separately loaded reward model's
    head reads *its* backbone's features, not the shared base's.
    """
    from peft import LoraConfig, TaskType

    if rm is not None:
        copy_adapter(policy, rm.model.adapter, SharedBaseValue.adapter)
        head = value_head_from_reward(rm.model.head, {"weights": rm.weights.tolist(), "scale": rm.scale.tolist()})
    else:
        lora = cfg.model.lora
        targets = lora.target_modules
        policy.add_adapter(SharedBaseValue.adapter, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=TaskType.CAUSAL_LM,
            target_modules=targets[0] if targets == ["all-linear"] else list(targets)))
        hidden = policy.get_base_model().config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1, bias=True)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        for name, p in policy.named_parameters():
            if adapter_tensor(name, SharedBaseValue.adapter):
                p.requires_grad_(True)
    head.requires_grad_(True)
    return SharedBaseValue(policy, head)


def check_reference_vocab(policy_tok, policy_model, ref_path: str, cfg: ModelConfig) -> None:
    """A reference with a different vocabulary makes per-token KL meaningless: refuse it."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_path(ref_path)
    try:
        ref_cfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"ppo.reference {ref_path}: cannot read its config ({e})") from None
    n_policy = policy_model.get_input_embeddings().weight.shape[0]
    if getattr(ref_cfg, "vocab_size", n_policy) != n_policy:
        raise ModelLoadError(f"ppo.reference {ref_path}: vocabulary of {ref_cfg.vocab_size} tokens, "
                             f"the policy has {n_policy}; the reference must share the policy's tokenizer")
    try:
        ref_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # no tokenizer saved with the reference: the embedding size check above is all we have
    if not same_vocab(ref_tok, policy_tok):
        raise ModelLoadError(f"ppo.reference {ref_path}: its tokenizer's vocabulary differs from the policy's "
                             f"({len(ref_tok)} vs {len(policy_tok)} tokens); the reference must share the policy's "
                             "tokenizer")


# ----------------------------------------------------------------------------- rollout pieces


@torch.no_grad()
def sample(model, b_query, b_query_mask, tokenizer, response_length: int, temperature: float):
    """Sample (B, response_length) tokens from left-padded prompts with the KV cache."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=response_length, min_new_tokens=0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           use_cache=True)
    out = model.generate(input_ids=b_query, attention_mask=b_query_mask, generation_config=gen)
    response = out[:, b_query.shape[1]:]
    if response.shape[1] < response_length:  # every row stopped early
        pad = response.new_full((response.shape[0], response_length - response.shape[1]), tokenizer.pad_token_id)
        response = torch.cat([response, pad], dim=1)
    return response


def truncate_after_eos(b_response, eos_id: int, pad_id: int):
    """Keep each response up to and including its first EOS; mask and pad everything after.

    Returns (response, response_mask (B, R) bool, ended (B,) bool).
    """
    is_eos = b_response == eos_id
    ended = is_eos.any(-1)
    R = b_response.shape[1]
    first = torch.where(ended, is_eos.int().argmax(-1), torch.full_like(ended, R, dtype=torch.long))
    positions = torch.arange(R, device=b_response.device)[None]
    response_mask = positions <= first[:, None]
    return torch.where(response_mask, b_response, torch.full_like(b_response, pad_id)), response_mask, ended


def sequence_inputs(b_query, b_query_mask, b_response, b_response_mask):
    """Prompt + response: input ids, attention mask (no left pad, nothing after EOS), positions."""
    input_ids = torch.cat([b_query, b_response], dim=1)
    attention_mask = torch.cat([b_query_mask.long(), b_response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def forward_response(model, input_ids, attention_mask, position_ids, context_length: int, temperature: float):
    """Policy logits (B, R, V) for the response tokens and their log-probs (B, R) at ``temperature``.

    Only the last R + 1 positions go through the LM head (``logits_to_keep``, where the model
    takes it): the prompt positions' (B, L, V) logits are the largest activation for real vocabularies.
    """
    n_response = input_ids.shape[1] - context_length
    keep = {"logits_to_keep": n_response + 1} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **keep).logits
    logits = logits[:, -(n_response + 1):-1]  # position t predicts token t + 1
    return logits, logprobs_from_logits(logits, input_ids[:, context_length:], temperature)


def _takes_logits_to_keep(model) -> bool:
    while hasattr(model, "module"):  # DDP and other wrappers
        model = model.module
    return _forward_takes_logits_to_keep(type(model.get_base_model() if is_peft(model) else model))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class) -> bool:  # once per class, not per forward pass
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def ppo_minibatch_loss(policy, value_model, mb: dict, context_length: int, ppo: PPOSettings):
    """Clipped policy loss + vf_coef * clipped value loss on one minibatch; returns (loss, stats).

    mb holds input_ids, attention_mask, position_ids (B, P + R) and, per response token (B, R):
    response_mask, logprobs, values, advantages, returns (all from the rollout).
    """
    mask = mb["response_mask"]
    logits, new_logprobs = forward_response(policy, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                                            context_length, ppo.temperature)
    new_values = value_model(mb["input_ids"], mb["attention_mask"], mb["position_ids"])[:, context_length - 1:-1]
    pg_loss, pg_clipfrac, approx_kl = policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask,
                                                  ppo.clip_range)
    vf_loss, vf_clipfrac = value_loss(new_values, mb["values"], mb["returns"], mask, ppo.clip_range_value)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.float() / ppo.temperature), mask)
    loss = pg_loss + ppo.vf_coef * vf_loss
    stats = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "policy/clipfrac": pg_clipfrac,
             "policy/approx_kl": approx_kl, "value/clipfrac": vf_clipfrac, "policy/entropy": entropy}
    return loss, stats


def gold_available(cfg: PPOConfig) -> bool:
    """The built-in task's gold reward is known for its prompts (any built-in data kind)."""
    return all(f.startswith("builtin:") for f in cfg.data.train_files)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def rollout(policy, reference, reward, prompts: list[Prompt], tokenizer, ppo: PPOSettings, chunk: int,
            device, with_gold: bool = False) -> dict:
    """Sample, score and compare with the reference on ``prompts``; per-response tensors.

    ``reference`` is a model or None (LoRA: the policy with its adapter disabled).
    """
    b_query, b_query_mask = left_pad([p.ids for p in prompts], tokenizer.pad_token_id)
    b_query, b_query_mask = b_query.to(device), b_query_mask.to(device)
    P = b_query.shape[1]
    responses = [sample(policy, b_query[i:i + chunk], b_query_mask[i:i + chunk], tokenizer, ppo.response_length,
                        ppo.temperature) for i in range(0, len(prompts), chunk)]
    b_response, b_response_mask, b_ended = truncate_after_eos(torch.cat(responses), tokenizer.eos_token_id,
                                                              tokenizer.pad_token_id)
    # Drop the columns after the longest response: they are masked in every row, so they change
    # nothing, but every later pass (log-probs, values, PPO epochs) would pay for them.
    width = int(b_response_mask.any(0).nonzero().max()) + 1  # column 0 is always kept
    b_response, b_response_mask = b_response[:, :width], b_response_mask[:, :width]
    b_input_ids, b_attention_mask, b_position_ids = sequence_inputs(b_query, b_query_mask, b_response,
                                                                    b_response_mask)
    texts = decode_responses(tokenizer, b_response, b_response_mask, b_ended)
    prompt_values = [p.example.prompt for p in prompts]
    b_scores = reward(prompt_values, texts, b_ended.tolist()).to(device)
    logprobs, ref_logprobs = [], []
    for i in range(0, len(prompts), chunk):
        args = (b_input_ids[i:i + chunk], b_attention_mask[i:i + chunk], b_position_ids[i:i + chunk], P,
                ppo.temperature)
        logprobs.append(forward_response(policy, *args)[1])
        with adapters_off(policy) if reference is None else nullcontext():
            ref_logprobs.append(forward_response(reference if reference is not None else policy, *args)[1])
    out = dict(query=b_query, query_mask=b_query_mask, response=b_response, response_mask=b_response_mask,
               ended=b_ended, input_ids=b_input_ids, attention_mask=b_attention_mask, position_ids=b_position_ids,
               texts=texts, scores=b_scores, logprobs=torch.cat(logprobs), ref_logprobs=torch.cat(ref_logprobs))
    if with_gold:
        from alignkit.builtin import gold_reward

        out["gold"] = torch.tensor(gold_reward(prompt_values, texts), dtype=torch.float32)
    return out


def decode_responses(tokenizer, b_response, b_response_mask, b_ended) -> list[str]:
    texts = []
    for row, m, e in zip(b_response, b_response_mask, b_ended):
        ids = row[m].tolist()
        if e:
            ids = ids[:-1]  # the EOS itself is not text; the reward model adds its own
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def evaluate(policy, reference, reward, prompts, tokenizer, ppo, chunk, device, with_gold, seed,
             accelerator=None) -> dict:
    """Held-out metrics: mean score, gold reward (and its std), KL per response, length, EOS share.

    With several processes each answers its share of the prompts and the per-response
    values of all processes are gathered, so every process returns the metrics of all prompts.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = prompts[rank::world]
    rows = []
    if mine:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed + rank)  # the same sampling noise before and after training
        r = rollout(policy, reference, reward, mine, tokenizer, ppo, chunk, device, with_gold)
        torch.random.set_rng_state(state)
        mask = r["response_mask"]
        kl = torch.where(mask, r["logprobs"] - r["ref_logprobs"], torch.zeros_like(r["logprobs"])).sum(-1)
        columns = [r["scores"].float(), kl.float(), mask.sum(-1).float(), r["ended"].float()]
        if with_gold:
            columns.append(r["gold"].float())
        rows = torch.stack([c.cpu() for c in columns], -1).tolist()
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    t = torch.tensor(rows, dtype=torch.float32)
    out = {"eval/score": t[:, 0].mean().item(), "eval/kl": t[:, 1].mean().item(),
           "eval/response_length": t[:, 2].mean().item(), "eval/eos_share": t[:, 3].mean().item(),
           "eval/responses": len(rows)}
    if with_gold:
        out["eval/gold_reward"] = t[:, 4].mean().item()
        out["eval/gold_reward_std"] = t[:, 4].std().item()
    return out


# ----------------------------------------------------------------------------- training


def train_ppo(cfg: PPOConfig) -> dict:
    ppo = cfg.ppo
    accelerator = engine.make_accelerator(cfg.train, cfg.log, cfg.output_dir)
    engine.seed_everything(cfg.train.seed)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # Tokenizer and prompts: bad data stops the run before any model loads.
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    train_prompts, train_rows = load_prompts(cfg.data.train_files, tokenizer, cfg.data, cfg.train.seed)
    eval_prompts, eval_rows = (load_prompts(cfg.data.eval_files, tokenizer, cfg.data, cfg.train.seed,
                                            limit=ppo.eval_samples, split="eval")
                               if cfg.data.eval_files and ppo.eval_samples else ([], None))
    ptx_rows = _ptx_rows(cfg, tokenizer) if ppo.ptx_coef > 0 else []
    with_gold = gold_available(cfg)

    # Reward sources (models are frozen, in eval mode), then policy, reference and value. In shared-base
    # mode the policy comes first: a reward model that is a LoRA adapter of the policy's base joins it.
    policy_path = resolve_path(cfg.model.name_or_path)
    if not ppo.shared_base:
        reward = build_reward(cfg.reward.sources, device=device, batch_size=cfg.reward.batch_size)
    policy = load_model(cfg.model, task="causal-lm")
    disable_dropout(policy)
    if ppo.shared_base:
        reward = build_reward(cfg.reward.sources, device=device, batch_size=cfg.reward.batch_size,
                              shared_base=SharedBase(policy, policy_path))
        for m in reward.models:
            if not m.shared:
                accelerator.print(f"ppo.shared_base: reward model {m.name} is not a LoRA adapter of the policy's base "
                                  f"({policy_path}): loaded as its own network")
    if cfg.ppo.reference is not None:
        check_reference_vocab(tokenizer, policy, cfg.ppo.reference, cfg.model)
    if cfg.model.lora.enabled and cfg.ppo.reference is None:
        reference = None  # the policy with its adapter disabled: no second copy in memory
    else:
        ref_cfg = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False))
        reference = load_model(ref_cfg, task="causal-lm", trainable=False, path=cfg.ppo.reference or policy_path)
        disable_dropout(reference)
        reference.to(device)
        # Same autocast as the policy (accelerate wraps forward; no DDP), so the KL starts at exactly 0.
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    value_model, value_note = load_value_model(cfg, tokenizer, policy_path, reward, policy)
    # bf16 autocast on CPU: attention in fp32, the fast kernel there (as SFT and RM do).
    for m in (policy, reference, value_model.model if isinstance(value_model, ValueModel) else None):
        if m is not None:
            engine.use_fp32_attention_on_cpu(m, accelerator)
    memory_mode = ("shared_base" if ppo.shared_base else "lora" if cfg.model.lora.enabled else "full") + (
        "-8bit" if cfg.model.load_in_8bit else "-4bit" if cfg.model.load_in_4bit else "")
    trainable_policy, total_policy = count_parameters(policy)
    trainable_value, _ = count_parameters(value_model)

    # Schedule: one optimizer step per minibatch per PPO epoch.
    if cfg.train.max_steps > 0:
        total_updates = cfg.train.max_steps
    else:
        total_updates = max(1, math.ceil(cfg.train.num_epochs * len(train_prompts) / (ppo.rollout_batch_size * world)))
    optimizer_steps = total_updates * ppo.ppo_epochs * ppo.num_minibatches
    params = [(f"policy.{n}", p) for n, p in policy.named_parameters()] + \
             [(f"value.{n}", p) for n, p in value_model.named_parameters()]
    # Shared base: the same frozen tensors appear twice; keep each trainable tensor once.
    seen, unique = set(), []
    for n, p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    optimizer, scheduler = engine.make_optimizer(None, cfg.train, optimizer_steps, params=unique)
    train_params = [p for _, p in unique if p.requires_grad]  # what is clipped, averaged and compared
    # Shared base: the value and reward read the policy's module with other adapters switched on, which DDP
    # cannot follow; with several processes the gradients are averaged by hand instead (engine.average_gradients).
    hand_sync = ppo.shared_base and world > 1
    if hand_sync:  # autocast (mixed precision) without DDP
        policy = accelerator.prepare_model(policy, evaluation_mode=True)
        value_model = accelerator.prepare_model(value_model, evaluation_mode=True)
        optimizer = accelerator.prepare(optimizer)
    else:
        policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    raw_policy = accelerator.unwrap_model(policy)
    kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
              else FixedKLController(ppo.kl_coef))

    update, state, logger = engine.start_run(accelerator, cfg, {"policy": policy, "value": value_model},
                                             {"model": optimizer}, {"model": scheduler})
    if state:
        kl_ctl.kl_coef = state["kl_coef"]
    if hand_sync:
        engine.broadcast_parameters(train_params, accelerator)

    chunk = cfg.train.per_device_batch_size
    ref_model = reference  # None with LoRA: the policy under adapters_off

    def run_eval():
        raw_policy.eval()
        return evaluate(raw_policy, ref_model, reward, eval_prompts, tokenizer, ppo, chunk, device, with_gold,
                        cfg.train.seed + 12345, accelerator)

    eval_before = run_eval() if eval_prompts and update == 0 else None
    if eval_before is not None:
        logger.log(eval_before, step=0)
    accelerator.print(f"ppo: {len(train_prompts)} prompts, {total_updates} updates of {ppo.rollout_batch_size} x "
                      f"{world} responses, value from {value_note}, memory mode {memory_mode}")

    bar = engine.progress(accelerator, total_updates, initial=update, desc="ppo", enabled=cfg.log.progress)
    minibatch_size = ppo.rollout_batch_size // ppo.num_minibatches
    accum = cfg.train.gradient_accumulation_steps
    micro_size = minibatch_size // accum
    ptx_iter = _ptx_batches(ptx_rows, micro_size, tokenizer, cfg.train.seed) if ptx_rows else None
    start, last_log, update_seconds = time.time(), {}, []
    while update < total_updates:
        t0 = time.time()
        # Same sampling noise whether the run was resumed or not.
        torch.manual_seed(cfg.train.seed + 1000 * update + rank)
        batch_prompts, data_epoch = prompt_batch(train_prompts, update, ppo.rollout_batch_size, rank, world,
                                                 cfg.train.seed)
        raw_policy.eval()
        value_model.eval()

        # 1. generate + 2. score + 3a. policy and reference log-probs (no grad)
        r = rollout(raw_policy, ref_model, reward, batch_prompts, tokenizer, ppo, chunk, device, with_gold)
        t_rollout = time.time() - t0
        b_input_ids, b_attention_mask, b_position_ids = r["input_ids"], r["attention_mask"], r["position_ids"]
        b_response_mask, b_ended = r["response_mask"], r["ended"]
        b_logprobs, b_ref_logprobs = r["logprobs"], r["ref_logprobs"]
        context_length = r["query"].shape[1]
        b_scores = r["scores"]
        if ppo.missing_eos_penalty is not None:
            b_scores = torch.where(b_ended, b_scores, b_scores + ppo.missing_eos_penalty)
        engine.check_finite(b_scores, "reward", update, cfg.output_dir)

        # 3b. values of the rollout (no grad)
        with torch.no_grad():
            b_values = torch.cat([value_model(b_input_ids[i:i + chunk], b_attention_mask[i:i + chunk],
                                              b_position_ids[i:i + chunk])[:, context_length - 1:-1]
                                  for i in range(0, len(batch_prompts), chunk)])

        # 4. rewards + GAE
        b_kl = kl_penalty(b_logprobs, b_ref_logprobs, ppo.kl_estimator)
        b_rewards, b_non_score = per_token_rewards(b_scores, b_kl, kl_ctl.kl_coef, b_response_mask)
        if ppo.whiten_rewards:
            b_rewards = masked_whiten(b_rewards, b_response_mask, shift_mean=False)
        b_advantages, b_returns = gae_advantages(b_rewards, b_values, b_response_mask, ppo.gamma, ppo.lam)
        b_advantages = masked_whiten(b_advantages, b_response_mask)

        # 5. PPO epochs over shuffled minibatches
        policy.train()
        value_model.train()
        b = dict(input_ids=b_input_ids, attention_mask=b_attention_mask, position_ids=b_position_ids,
                 response_mask=b_response_mask, logprobs=b_logprobs, values=b_values, advantages=b_advantages,
                 returns=b_returns)
        stats_sum: dict[str, torch.Tensor] = {}
        n_stats = 0
        for _ in range(ppo.ppo_epochs):
            b_order = torch.randperm(ppo.rollout_batch_size)
            for mb_start in range(0, ppo.rollout_batch_size, minibatch_size):
                mb_order = b_order[mb_start:mb_start + minibatch_size]
                for k in range(accum):
                    mb_idx = mb_order[k * micro_size:(k + 1) * micro_size].to(device)
                    mb = {name: t[mb_idx] for name, t in b.items()}
                    sync = k == accum - 1
                    with ExitStack() as stack:
                        if not sync:
                            stack.enter_context(accelerator.no_sync(policy))
                            stack.enter_context(accelerator.no_sync(value_model))
                        loss, stats = ppo_minibatch_loss(policy, value_model, mb, context_length, ppo)
                        if ptx_iter is not None:
                            ptx_loss = _ptx_loss(policy, next(ptx_iter), device)
                            loss = loss + ppo.ptx_coef * ptx_loss
                            stats["loss/ptx"] = ptx_loss.detach()
                        engine.check_finite(loss.detach(), "PPO loss", update, cfg.output_dir)
                        accelerator.backward(loss / accum)
                    for name, v in stats.items():
                        stats_sum[name] = stats_sum.get(name, 0.0) + v.float()
                    n_stats += 1
                if hand_sync:
                    engine.average_gradients(train_params, accelerator)
                engine.optimizer_step(accelerator, train_params, optimizer, scheduler, cfg.train.max_grad_norm)

        # Statistics of this update, averaged over processes.
        with torch.no_grad():
            kl_per_seq = torch.where(b_response_mask, b_kl, torch.zeros_like(b_kl)).sum(-1)
            m = {name: v / n_stats for name, v in stats_sum.items()}
            m.update({
                "objective/score": b_scores.mean(), "objective/kl": kl_per_seq.mean(),
                "objective/non_score_reward": b_non_score.sum(-1).mean(),
                "objective/rlhf_reward": b_scores.mean() + b_non_score.sum(-1).mean(),
                "value/explained_variance": explained_variance(b_values, b_returns, b_response_mask),
                "rollout/response_length": b_response_mask.sum(-1).float().mean(),
                "rollout/eos_share": b_ended.float().mean(),
            })
            if with_gold:
                m["objective/gold_reward"] = r["gold"].to(device).mean()
            names = sorted(m)
            values = accelerator.reduce(torch.stack([torch.as_tensor(m[n], device=device).float() for n in names]),
                                        "mean")
            m = dict(zip(names, values.tolist()))
        kl_ctl.update(m["objective/kl"], ppo.rollout_batch_size * world)
        if ppo.adaptive_kl and ppo.kl_coef_min is not None:
            kl_ctl.kl_coef = max(kl_ctl.kl_coef, ppo.kl_coef_min)
        update += 1
        update_seconds.append(time.time() - t0)
        bar.update(1)
        if update % cfg.train.log_every == 0 or update == total_updates or update == 1:
            last_log = {**m, "train/kl_coef": kl_ctl.kl_coef, "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": data_epoch, "time/rollout_seconds": t_rollout,
                        "time/update_seconds": update_seconds[-1]}
            logger.log(last_log, step=update)
            bar.set_postfix(score=f"{m['objective/score']:.3f}", kl=f"{m['objective/kl']:.2f}")
        if eval_prompts and cfg.train.eval_every and update % cfg.train.eval_every == 0 and update < total_updates:
            logger.log(run_eval(), step=update)
        if cfg.train.save_every and update % cfg.train.save_every == 0 and update < total_updates:
            engine.save_checkpoint(accelerator, cfg.output_dir, update, {"policy": policy, "value": value_model},
                                   {"model": optimizer}, {"model": scheduler}, {"kl_coef": kl_ctl.kl_coef},
                                   keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    # Processes must end with the same weights (DDP, or hand-averaged gradients in shared-base mode).
    replica_diff = engine.replica_difference(train_params, accelerator)
    eval_after = run_eval() if eval_prompts else None
    if eval_after is not None:
        logger.log(eval_after, step=update)
    accelerator.wait_for_everyone()
    final_dir, value_dir = os.path.join(cfg.output_dir, "final"), os.path.join(cfg.output_dir, "final_value")
    if accelerator.is_main_process:
        save_policy_and_value(raw_policy, accelerator.unwrap_model(value_model), tokenizer, final_dir, value_dir,
                              cfg)
        plot_metrics(cfg.output_dir)
    summary = {
        "stage": "ppo", "updates": update, "runtime_seconds": round(runtime, 2),
        "seconds_per_update": round(sum(update_seconds) / max(1, len(update_seconds)), 3) if update_seconds else None,
        "memory_mode": memory_mode, "peak_rss_mb": round(_peak_rss_mb(), 1), "value_init": value_note,
        "kl_coef": kl_ctl.kl_coef, "last": last_log, "eval_before": eval_before, "eval_after": eval_after,
        "trainable_parameters": {"policy": trainable_policy, "value": trainable_value},
        "total_parameters": total_policy, "num_processes": world, "replica_max_abs_difference": replica_diff,
        "prompts": len(train_prompts),
        "rows": {"train": train_rows.to_dict(), **({"eval": eval_rows.to_dict()} if eval_rows else {})},
        "final_dir": final_dir, "value_dir": value_dir,
    }
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    accelerator.end_training()
    return summary


def save_policy_and_value(policy, value_model, tokenizer, final_dir: str, value_dir: str, cfg: PPOConfig) -> None:
    """final/: the policy (full model, or LoRA adapter [+ final_merged/]); final_value/: the value model.

    The value model is a one-output sequence-classification model (or its LoRA adapter),
    loadable with ``AutoModelForSequenceClassification``. In shared-base mode it is the
    "value" LoRA adapter of the policy's base plus ``value_head.safetensors``.
    """
    os.makedirs(value_dir, exist_ok=True)
    if isinstance(value_model, SharedBaseValue):
        import shutil

        from safetensors.torch import save_file

        tmp = value_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp, selected_adapters=[SharedBaseValue.adapter], safe_serialization=True)
        src = os.path.join(tmp, SharedBaseValue.adapter)  # peft writes a non-default adapter in a subfolder
        for name in os.listdir(src):
            shutil.move(os.path.join(src, name), os.path.join(value_dir, name))
        shutil.rmtree(tmp, ignore_errors=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in value_model.head.state_dict().items()},
                  os.path.join(value_dir, "value_head.safetensors"))
        tokenizer.save_pretrained(value_dir)
    else:
        value_model.model.save_pretrained(value_dir, safe_serialization=True)
        tokenizer.save_pretrained(value_dir)
    if is_peft(policy):  # final/ holds the policy's adapter only, not the shared value/reward adapters
        for name in [n for n in policy.peft_config if n != "default"]:
            policy.delete_adapter(name)
    save_model(policy, tokenizer, final_dir, cfg.model)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- PPO-ptx


def _ptx_rows(cfg: PPOConfig, tokenizer) -> list[dict]:
    """Demonstrations for PPO-ptx, prepared exactly as SFT prepares them (one example per row)."""
    from alignkit.schema import demonstrations
    from alignkit.tokenization import encode_pairs, sft_rows

    pairs = demonstrations(load_examples(cfg.ppo.ptx_files, seed=cfg.train.seed))
    if not pairs:
        raise DataError([f"{', '.join(cfg.ppo.ptx_files)}: labels: no demonstrations found for PPO-ptx"])
    tok = load_tokenizer(cfg.model, padding_side="right")
    encoded, _ = encode_pairs(tok, pairs, cfg.data.max_length + cfg.ppo.response_length, cfg.data.truncation)
    return sft_rows(encoded, cfg.data.max_length + cfg.ppo.response_length, packing=False)


def _ptx_batches(rows, batch_size, tokenizer, seed):
    from alignkit.sft import make_loader
    from alignkit.tokenization import collate_sft

    loader = make_loader(rows, batch_size, lambda rs: collate_sft(rs, tokenizer.pad_token_id), seed)
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _ptx_loss(policy, batch, device):
    from alignkit.sft import sft_token_loss

    batch = {k: v.to(device) for k, v in batch.items() if k != "num_tokens"}
    labels = batch.pop("labels")
    loss_sum, n = sft_token_loss(policy(**batch, use_cache=False).logits, labels)
    return loss_sum / n.clamp(min=1)


# ----------------------------------------------------------------------------- plots


PLOTTED = ["objective/score", "objective/gold_reward", "objective/kl", "train/kl_coef", "objective/non_score_reward",
           "policy/entropy", "policy/clipfrac", "policy/approx_kl", "loss/value", "value/explained_variance",
           "rollout/response_length", "rollout/eos_share"]


def plot_metrics(output_dir: str) -> str | None:
    """output_dir/curves.png: one panel per logged PPO statistic (held-out evals as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = engine.read_metrics(output_dir)
    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    if not keys:
        return None
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 2.8 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), lw=1.2)
        ev = {"objective/score": "eval/score", "objective/gold_reward": "eval/gold_reward", "objective/kl": "eval/kl"}
        if key in ev:
            epts = [(r["step"], r[ev[key]]) for r in rows if ev[key] in r]
            if epts:
                ax.plot(*zip(*epts), "o--", ms=4, label="held-out")
                ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("PPO update", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(output_dir, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
