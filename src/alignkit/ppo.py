"""PPO with a per-token KL penalty against the SFT policy (InstructGPT step 3).

    alignkit ppo --config configs/ppo/tiny.yaml
    accelerate launch scripts/train_ppo.py --config configs/ppo/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_ppo.py --config configs/ppo/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_ppo.py --config ... --train.sharding=fsdp2

From Python: ``train_ppo(load_config(PPOConfig, "configs/ppo/tiny.yaml",
["model.name_or_path=runs/sft-tiny/final", "reward.sources=[{name_or_path: runs/rm-tiny/final}]"]))``.

``train_ppo`` reads: accelerator -> tokenizer -> prompts (validated first) -> reward ->
policy, reference, value -> one loop per PPO update with five named phases:

    # 1. generate          sample responses from left-padded prompts, cut after the first EOS
    # 2. score             reward on prompt + truncated response text (missing-EOS penalty)
    # 3. log-probs/values  policy, reference (same temperature) and value per response token
    # 4. advantages        -kl_coef * KL per token + score on the last token; GAE (or critic-free)
    # 5. PPO epochs        clipped policy (+ value) loss over shuffled minibatches

Critic-free: ``ppo.advantage: rloo | grpo | reinforce_pp`` replaces GAE in phase 4 by a
baseline from the other samples of the same prompt (``ppo.samples_per_prompt`` k, kept side
by side) or from the whole batch; no value model is loaded then (no 3b, no value loss).
``ppo.kl_in_loss`` moves the KL from the reward into the loss (GRPO). Same loop, same
metrics, checkpoints and report:

    alignkit ppo --config configs/ppo/tiny_rloo.yaml
    alignkit ppo --config configs/ppo/tiny_grpo.yaml

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
import math
import os
import resource
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from alignkit import engine, sharding
from alignkit.adapters import AdapterHead, SharedBase, save_adapter_head
from alignkit.config import ConfigError, DataConfig, LogConfig, ModelConfig, TrainConfig
from alignkit.losses import AdaptiveKLController, FixedKLController, explained_variance, kl_penalty, sequence_kl
from alignkit.modeling import (
    check_reference_vocab,
    count_parameters,
    disable_dropout,
    is_peft,
    load_model,
    load_tokenizer,
    resolve_path,
    save_model,
)
from alignkit.plots import plot_metrics
from alignkit.ppo_update import Minibatch, compute_advantages, ppo_minibatch_loss
from alignkit.rewards import EnsembleReward, RewardSourceConfig, build_reward
from alignkit.rollout import evaluate, load_prompts, prompt_batch, rollout
from alignkit.sft import demonstration_batches, demonstration_rows, mean_token_loss
from alignkit.tokenization import unknown_token_share
from alignkit.value import load_value_model, save_value


ADVANTAGES = ("gae", "rloo", "grpo", "reinforce_pp")
UNKNOWN_TOKEN_WARN = 0.01  # share of <unk> tokens in the prompts, read by a reward model, worth a warning


@dataclass
class PPOSettings:
    # Responses per process per PPO update (the rollout batch): rollout_batch_size / samples_per_prompt
    # prompts, each sampled samples_per_prompt times.
    rollout_batch_size: int = 64
    # Optimizer steps per PPO epoch: the rollout batch is cut into this many shuffled minibatches.
    num_minibatches: int = 2
    # Passes over each rollout batch.
    ppo_epochs: int = 4
    # Most tokens sampled per response.
    response_length: int = 32
    # Sampling temperature; log-probs of policy and reference use it too (Huang et al. 2024).
    temperature: float = 1.0
    # Per-token KL estimator: k1 (logp - ref_logp) or k3 (exp(ref - logp) - 1 - (ref - logp), >= 0, lower
    # variance as an estimate of the KL's value). In the reward only k1's policy gradient is the KL's
    # gradient: a detached k3 penalty is second order near the reference (~k1^2 / 2 per token) and its
    # score-function gradient pushes the policy away from the reference (Tang & Munos 2025; Shah et al.
    # 2025). So with k3 the reward's penalty stays k1 (said at start) and the k3 sum is logged as
    # objective/kl_k3, unless kl_k3_in_reward; with kl_in_loss the loss term is k3 (kl_loss).
    kl_estimator: str = "k1"
    # kl_estimator: k3 only: put k3 itself in the reward, as TRL's kl_estimator="k3" does. Measured on
    # the task suite (benchmarks/README.md): the KL overshoots early and gold falls (extreme +0.94 SFT
    # std at KL 5.8 against k1's +2.07 at KL 4.3).
    kl_k3_in_reward: bool = False
    # Starting KL coefficient beta.
    kl_coef: float = 0.05
    # Adapt beta so the KL per response tracks kl_target (Ziegler et al. 2019); false: fixed beta.
    adaptive_kl: bool = True
    # Target KL of the adaptive controller, in nats per response: the k1 sum (log pi - log pi_ref over
    # the response) that eval/kl and the pipeline report show, whatever kl_estimator the reward uses.
    kl_target: float = 6.0
    # Controller horizon in responses: beta moves at most 20% * batch / horizon per update.
    kl_horizon: int = 256
    # Adaptive KL only: beta never falls below this (null: no floor). Without a floor, beta keeps
    # shrinking while the KL sits under its target (early on, or once the reward model saturates),
    # so a long run loses its brake; with one, kl_target acts as a ceiling the controller enforces.
    # 0.03 is what every shipped pipeline and the task-suite benchmarks run (benchmarks/README.md).
    kl_coef_min: Optional[float] = 0.03
    # Early stop of an update (target_kl of Spinning Up and Stable-Baselines3 PPO): before each optimizer
    # step after the first, the minibatch's approx KL to the rollout policy (k2, mean per response token,
    # averaged over processes) is checked; above this, the update's remaining steps are skipped. On a
    # flat (saturated) reward, whitened advantages are mostly noise and the epochs can run away in one
    # update (approx KL 30-300x its median); the policy saved at the end is then a spike. null: off.
    max_update_kl: Optional[float] = 0.02
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
    # Advantage estimator. gae: PPO with a value model (Schulman et al. 2015). Critic-free, no value
    # model in memory: rloo (REINFORCE leave-one-out, Ahmadian et al. 2024), grpo (group mean and std,
    # Shao et al. 2024), reinforce_pp (batch-whitened returns, Hu 2025).
    advantage: str = "gae"
    # k: each prompt of the rollout batch is sampled k times (samples side by side); rloo and grpo
    # take their baseline from the other k - 1 samples, so they need k >= 2.
    samples_per_prompt: int = 1
    # GRPO's KL: k3 KL to the reference added to the loss with coefficient beta (kl_coef, adaptive or
    # not) instead of -beta * KL in the reward.
    kl_in_loss: bool = False
    # grpo only: divide by the group's std. false: Dr. GRPO (Liu et al. 2025), which does not up-weight
    # prompts whose samples the reward barely tells apart (e.g. once a reward model saturates).
    scale_by_std: bool = True

    def __post_init__(self):
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"ppo.advantage: must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"ppo.samples_per_prompt: must be >= 1, got {self.samples_per_prompt}")
        if self.advantage in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage={self.advantage} needs ppo.samples_per_prompt >= 2 (its baseline is "
                              f"the other samples of the same prompt), got {self.samples_per_prompt}")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ConfigError(f"ppo.rollout_batch_size={self.rollout_batch_size} responses are not a whole number of "
                              f"prompts of ppo.samples_per_prompt={self.samples_per_prompt} samples")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"ppo.kl_estimator: must be k1 or k3, got {self.kl_estimator!r}")
        if self.kl_k3_in_reward and self.kl_estimator != "k3":
            raise ConfigError(f"ppo.kl_k3_in_reward: puts the k3 estimate in the reward, but ppo.kl_estimator is "
                              f"{self.kl_estimator!r}; set ppo.kl_estimator: k3 too")
        if self.rollout_batch_size < 1 or self.num_minibatches < 1 or self.ppo_epochs < 1:
            raise ConfigError("ppo.rollout_batch_size, ppo.num_minibatches and ppo.ppo_epochs must be >= 1")
        if self.rollout_batch_size % self.num_minibatches:
            raise ConfigError(f"ppo.rollout_batch_size={self.rollout_batch_size} is not divisible into "
                              f"ppo.num_minibatches={self.num_minibatches} minibatches")
        if self.temperature <= 0:
            raise ConfigError("ppo.temperature: must be > 0 (log-probs are taken at the sampling temperature)")
        if self.response_length < 1:
            raise ConfigError("ppo.response_length: must be >= 1")
        if self.max_update_kl is not None and self.max_update_kl <= 0:
            raise ConfigError(f"ppo.max_update_kl: must be > 0 (or null: no early stop), got {self.max_update_kl}")
        if self.adaptive_kl and self.kl_target <= 0:
            raise ConfigError("ppo.kl_target: must be > 0 with ppo.adaptive_kl")
        if self.adaptive_kl and self.kl_coef_min is not None and not 0 <= self.kl_coef_min <= self.kl_coef:
            raise ConfigError(f"ppo.kl_coef_min: must be between 0 and ppo.kl_coef={self.kl_coef}, got "
                              f"{self.kl_coef_min} (the adaptive controller's floor, default 0.03: lower it with "
                              "ppo.kl_coef, or null for no floor)")
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
        if sharding.requested(self.train) and self.ppo.shared_base:  # fsdp2, or an accelerate FSDP config
            raise ConfigError("ppo.shared_base: not under FSDP2 sharding (train.sharding=fsdp2 or an accelerate FSDP "
                              "config): its adapters switch on one base inside a step; use train.sharding=none with "
                              "configs/accelerate/multi_gpu.yaml, or ppo.shared_base=false")
        minibatch = self.ppo.rollout_batch_size // self.ppo.num_minibatches
        if minibatch % self.train.gradient_accumulation_steps:
            raise ConfigError(f"train.gradient_accumulation_steps={self.train.gradient_accumulation_steps} does not "
                              f"divide a minibatch of {minibatch} (ppo.rollout_batch_size="
                              f"{self.ppo.rollout_batch_size} / ppo.num_minibatches={self.ppo.num_minibatches})")
        if self.ppo.shared_base and not self.model.lora.enabled:
            raise ConfigError("ppo.shared_base: needs model.lora.enabled=true (adapters on one frozen base)")

    @property
    def uses_critic(self) -> bool:
        return self.ppo.advantage == "gae"


# ----------------------------------------------------------------------------- training


def gold_available(cfg: PPOConfig) -> bool:
    """The built-in task's gold reward is known for its prompts (any built-in data kind)."""
    return all(f.startswith("builtin:") for f in cfg.data.train_files)


# ----------------------------------------------------------------------------- training


def reward_kl_estimator(ppo: PPOSettings) -> str:
    """The per-token KL estimator of the reward's penalty: k1, unless k3 is asked for in the reward itself
    (ppo.kl_k3_in_reward) or the penalty is a loss term (kl_in_loss: the reward's copy is only logged)."""
    return ppo.kl_estimator if (ppo.kl_k3_in_reward or ppo.kl_in_loss) else "k1"


def update_kl_exceeded(approx_kl: torch.Tensor, ppo: PPOSettings, accelerator) -> bool:
    """ppo.max_update_kl: has this update moved the policy too far from the rollout policy? The same
    answer on every process (the approx KL is averaged over them), so all stop at the same step."""
    if ppo.max_update_kl is None:
        return False
    kl = accelerator.reduce(approx_kl.detach().float().reshape(1).to(accelerator.device), "mean")
    return kl.item() > ppo.max_update_kl


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
    ptx = (demonstration_rows(ppo.ptx_files, load_tokenizer(cfg.model, padding_side="right"),
                              cfg.data.max_length + ppo.response_length, cfg.data.truncation, cfg.train.seed, "PPO-ptx")
           if ppo.ptx_coef > 0 else [])
    with_gold = gold_available(cfg)

    # Reward sources (models are frozen, in eval mode), then policy, reference and value. In shared-base
    # mode the policy comes first: a reward model that is a LoRA adapter of the policy's base joins it.
    policy_path = resolve_path(cfg.model.name_or_path)
    if not ppo.shared_base:
        reward = build_reward(cfg.reward.sources, device=device, batch_size=cfg.reward.batch_size)
    policy = load_model(cfg.model, task="causal-lm")
    disable_dropout(policy)
    if ppo.shared_base:
        if not (cfg.model.load_in_4bit or cfg.model.load_in_8bit):  # 8-/4-bit weights load onto the device
            policy.to(device)  # before the reward adapter joins: its head is made where the base is
        reward = build_reward(cfg.reward.sources, device=device, batch_size=cfg.reward.batch_size,
                              shared_base=SharedBase(policy, policy_path))
        for m in reward.models:
            if not m.shared:
                accelerator.print(f"ppo.shared_base: reward model {m.name} is not a LoRA adapter of the policy's base "
                                  f"({policy_path}): loaded as its own network")
    prompt_texts = [" ".join(str(t["content"]) for t in p.example.messages) for p in train_prompts[:256]]
    for m in reward.models:  # a reward model with its own tokenizer reads the policy's text retokenized
        share = unknown_token_share(m.tokenizer, prompt_texts)
        if share > UNKNOWN_TOKEN_WARN:
            accelerator.print(f"warning: reward model {m.name}: {share:.1%} of the tokens of the training prompts are "
                              f"its tokenizer's unknown token {m.tokenizer.unk_token!r}: it cannot read what it "
                              "scores (a reward model trained on other text, or on another tokenizer's vocabulary)")
    if ppo.kl_estimator != reward_kl_estimator(ppo):
        accelerator.print("ppo.kl_estimator=k3: the reward's KL penalty stays k1 (log pi - log pi_ref per token), the "
                          "only estimator whose policy gradient in a reward is the KL's; k3 is logged as "
                          "objective/kl_k3. ppo.kl_k3_in_reward: true puts k3 in the reward (as TRL does), "
                          "ppo.kl_in_loss: true puts it in the loss (as GRPO does)")
    if ppo.reference is not None:
        check_reference_vocab(tokenizer, policy, ppo.reference, cfg.model)
    if cfg.model.lora.enabled and ppo.reference is None:
        reference = None  # the policy with its adapter disabled: no second copy in memory
    else:
        ref_cfg = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False))
        reference = load_model(ref_cfg, task="causal-lm", trainable=False, path=ppo.reference or policy_path)
        disable_dropout(reference)
        reference.to(device)
        if sharding.requested(cfg.train):  # sharded like the policy (same bf16 policy): 1/N of it per process
            reference = engine.shard(reference, accelerator, cfg.train)
        else:  # same autocast as the policy (accelerate wraps forward; no DDP), so the KL starts at exactly 0
            reference = accelerator.prepare_model(reference, evaluation_mode=True)
    # Critic-free estimators: no value model at all (neither loaded nor trained nor saved).
    value_model, value_note = (load_value_model(cfg, tokenizer, policy_path, reward, policy) if cfg.uses_critic
                               else (None, f"none (ppo.advantage={ppo.advantage})"))
    value_net = None if value_model is None or isinstance(value_model.model, AdapterHead) else value_model.model
    # bf16 autocast on CPU: attention in fp32, the fast kernel there (as SFT and RM do).
    for m in (policy, reference, value_net):
        if m is not None:
            engine.use_fp32_attention_on_cpu(m, accelerator)
    memory_mode = ("shared_base" if ppo.shared_base else "lora" if cfg.model.lora.enabled else "full") + (
        "-8bit" if cfg.model.load_in_8bit else "-4bit" if cfg.model.load_in_4bit else "")
    trainable_policy, total_policy = count_parameters(policy)
    trainable_value = count_parameters(value_model)[0] if value_model is not None else 0
    # FSDP2 (train.sharding=fsdp2 or an accelerate FSDP config): policy and value sharded before the optimizer
    # is built on their shards; each keeps 1/N of its weights, gradients and AdamW state per process.
    policy = engine.shard(policy, accelerator, cfg.train)
    if value_net is not None:
        engine.shard(value_net, accelerator, cfg.train)
    sharded = sharding.is_sharded(policy)

    # Schedule: one optimizer step per minibatch per PPO epoch; k samples of each prompt per update.
    k_samples = ppo.samples_per_prompt
    prompts_per_update = ppo.rollout_batch_size // k_samples
    if cfg.train.max_steps > 0:
        total_updates = cfg.train.max_steps
    else:
        total_updates = max(1, math.ceil(cfg.train.num_epochs * len(train_prompts) / (prompts_per_update * world)))
    optimizer_steps = total_updates * ppo.ppo_epochs * ppo.num_minibatches
    # Shared base: the same frozen tensors appear under the policy and the value; keep each tensor once.
    named = [(f"policy.{n}", p) for n, p in policy.named_parameters()]
    if value_model is not None:
        named += [(f"value.{n}", p) for n, p in value_model.named_parameters()]
    unique = list({id(p): (n, p) for n, p in named}.values())
    optimizer, scheduler = engine.make_optimizer(None, cfg.train, optimizer_steps, params=unique)
    train_params = [p for _, p in unique if p.requires_grad]  # what is clipped, averaged and compared
    # Shared base: the value and reward read the policy's module with other adapters switched on, which DDP
    # cannot follow; with several processes the gradients are averaged by hand instead (engine.average_gradients).
    hand_sync = ppo.shared_base and world > 1
    if sharded:
        pass  # FSDP2 reduces the gradients itself: neither model nor optimizer is handed to accelerate
    elif hand_sync:  # autocast (mixed precision) without DDP
        policy = accelerator.prepare_model(policy, evaluation_mode=True)
        if value_model is not None:
            value_model = accelerator.prepare_model(value_model, evaluation_mode=True)
        optimizer = accelerator.prepare(optimizer)
    elif value_model is not None:
        policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    raw_policy = accelerator.unwrap_model(policy)
    trained = {"policy": policy} if value_model is None else {"policy": policy, "value": value_model}
    # A sharded checkpoint saves each optimizer with its model: the one optimizer spans policy and value.
    checkpointed = {"model": torch.nn.ModuleDict(trained)} if sharded else trained
    kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
              else FixedKLController(ppo.kl_coef))

    update, state, logger = engine.start_run(accelerator, cfg, checkpointed, {"model": optimizer},
                                             {"model": scheduler})
    if state:
        kl_ctl.kl_coef = state["kl_coef"]
    if hand_sync:
        engine.broadcast_parameters(train_params, accelerator)

    chunk = cfg.train.per_device_batch_size  # micro-batch of the no-grad rollout passes

    def run_eval():
        raw_policy.eval()
        # Processes answer different numbers of held-out prompts: full weights, no collectives.
        with engine.gathered(raw_policy), engine.gathered(reference) if reference is not None else nullcontext():
            return evaluate(raw_policy, reference, reward, eval_prompts, tokenizer, ppo.response_length,
                            ppo.temperature, chunk, device, with_gold, cfg.train.seed + 12345, accelerator)

    eval_before = run_eval() if eval_prompts and update == 0 else None
    if eval_before is not None:
        logger.log(eval_before, step=0)
    accelerator.print(f"ppo: {len(train_prompts)} prompts, {total_updates} updates of {ppo.rollout_batch_size} x "
                      f"{world} responses ({k_samples} per prompt), advantage {ppo.advantage}, value model "
                      f"{value_note}, memory mode {memory_mode}")

    bar = engine.progress(accelerator, total_updates, initial=update, desc="ppo", enabled=cfg.log.progress)
    minibatch_size = ppo.rollout_batch_size // ppo.num_minibatches
    accum = cfg.train.gradient_accumulation_steps
    micro_size = minibatch_size // accum
    ptx_batches = demonstration_batches(ptx, micro_size, tokenizer.pad_token_id, cfg.train.seed) if ptx else None
    start, last_log, update_seconds = time.time(), {}, []
    while update < total_updates:
        t0, cpu0 = time.time(), time.process_time()  # CPU seconds too: steadier than wall time on a shared machine
        # Same sampling noise whether the run was resumed or not.
        torch.manual_seed(cfg.train.seed + 1000 * update + rank)
        batch_prompts, data_epoch = prompt_batch(train_prompts, update, prompts_per_update, rank, world,
                                                 cfg.train.seed)
        batch_prompts = [p for p in batch_prompts for _ in range(k_samples)]  # a prompt's samples side by side
        raw_policy.eval()

        # 1. generate + 2. score + 3a. policy and reference log-probs (no grad)
        # Under FSDP2 the policy's full weights are gathered for the whole rollout: processes sample different
        # numbers of tokens. The sharded reference sees the same number of log-prob passes on every process.
        with engine.gathered(raw_policy):
            r = rollout(raw_policy, reference, reward, batch_prompts, tokenizer, ppo.response_length,
                        ppo.temperature, chunk, device, with_gold)
        t_rollout = time.time() - t0
        context_length = r.context_length
        b_scores = r.scores
        if ppo.missing_eos_penalty is not None:
            b_scores = torch.where(r.ended, b_scores, b_scores + ppo.missing_eos_penalty)
        engine.check_finite(b_scores, "reward", update, cfg.output_dir)

        # 3b. values of the rollout (no grad; GAE only)
        b_values = None
        if value_model is not None:
            value_model.eval()
            with torch.no_grad():
                b_values = torch.cat([value_model(r.input_ids[i:i + chunk], r.attention_mask[i:i + chunk],
                                                  r.position_ids[i:i + chunk])[:, context_length - 1:-1]
                                      for i in range(0, len(batch_prompts), chunk)])

        # 4. rewards + advantages (GAE, or a critic-free baseline)
        b_kl = kl_penalty(r.logprobs, r.ref_logprobs, reward_kl_estimator(ppo))
        b_advantages, b_returns, b_non_score = compute_advantages(ppo, b_scores, b_kl, kl_ctl.kl_coef,
                                                                  r.response_mask, b_values)

        # 5. PPO epochs over shuffled minibatches
        for m in trained.values():
            m.train()
        b = Minibatch(r.input_ids, r.attention_mask, r.position_ids, r.response_mask, r.logprobs, r.ref_logprobs,
                      b_advantages, b_values, b_returns)
        stats_sum: dict[str, torch.Tensor] = {}
        n_stats, steps_taken, early_stop = 0, 0, False
        for _ in range(ppo.ppo_epochs):
            b_order = torch.randperm(ppo.rollout_batch_size)
            for mb_start in range(0, ppo.rollout_batch_size, minibatch_size):
                mb_order = b_order[mb_start:mb_start + minibatch_size]
                for k in range(accum):
                    mb = b.select(mb_order[k * micro_size:(k + 1) * micro_size].to(device))
                    with ExitStack() as stack:
                        if k < accum - 1:  # gradients are all-reduced on the last micro-batch only
                            for m in trained.values():
                                stack.enter_context(engine.no_sync(accelerator, m))
                        loss, stats = ppo_minibatch_loss(policy, value_model, mb, context_length, ppo,
                                                         kl_ctl.kl_coef)
                        if k == 0 and steps_taken > 0 and update_kl_exceeded(stats.approx_kl, ppo, accelerator):
                            early_stop = True  # before this minibatch's backward: no gradient is left half-made
                            break
                        step_metrics = stats.metrics()
                        if ptx_batches is not None:  # PPO-ptx (InstructGPT eq. 2)
                            ptx_loss = mean_token_loss(policy, next(ptx_batches), device)
                            loss = loss + ppo.ptx_coef * ptx_loss
                            step_metrics["loss/ptx"] = ptx_loss.detach()
                        engine.check_finite(loss.detach(), "PPO loss", update, cfg.output_dir)
                        accelerator.backward(loss / accum)
                    for name, v in step_metrics.items():
                        stats_sum[name] = stats_sum.get(name, 0.0) + v.float()
                    n_stats += 1
                if early_stop:
                    break
                if hand_sync:
                    engine.average_gradients(train_params, accelerator)
                engine.optimizer_step(accelerator, train_params, optimizer, scheduler, cfg.train.max_grad_norm)
                steps_taken += 1
            if early_stop:
                break

        # Statistics of this update, averaged over processes.
        with torch.no_grad():
            m = {name: v / n_stats for name, v in stats_sum.items()}
            m.update({
                "objective/score": b_scores.mean(),
                # k1 whatever kl_estimator: the KL the held-out evaluation and the pipeline report show
                # (sum over the response of log pi - log pi_ref), so kl_target is in the units a user reads.
                "objective/kl": sequence_kl(r.logprobs, r.ref_logprobs, r.response_mask, "k1").mean(),
                "objective/non_score_reward": b_non_score.sum(-1).mean(),
                "objective/rlhf_reward": b_scores.mean() + b_non_score.sum(-1).mean(),
                "policy/update_steps": torch.tensor(float(steps_taken)),  # optimizer steps (fewer: early stop)
                "rollout/response_length": r.response_mask.sum(-1).float().mean(),
                "rollout/eos_share": r.ended.float().mean(),
            })
            if ppo.kl_estimator == "k3":  # the estimate asked for, logged beside the k1 sum the controller reads
                m["objective/kl_k3"] = sequence_kl(r.logprobs, r.ref_logprobs, r.response_mask, "k3").mean()
            spreads = [src.spread.mean() for src in reward.sources if isinstance(src, EnsembleReward)]
            if spreads:  # disagreement of the reward-model ensemble on this batch (std over members)
                m["objective/ensemble_std"] = torch.stack(spreads).mean()
            if b_values is not None:
                m["value/explained_variance"] = explained_variance(b_values, b_returns, r.response_mask)
            if with_gold:
                m["objective/gold_reward"] = r.gold.to(device).mean()
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
                        "time/update_seconds": update_seconds[-1],
                        "time/update_cpu_seconds": time.process_time() - cpu0}
            logger.log(last_log, step=update)
            bar.set_postfix(score=f"{m['objective/score']:.3f}", kl=f"{m['objective/kl']:.2f}")
        if eval_prompts and cfg.train.eval_every and update % cfg.train.eval_every == 0 and update < total_updates:
            logger.log(run_eval(), step=update)
        if cfg.train.save_every and update % cfg.train.save_every == 0 and update < total_updates:
            engine.save_checkpoint(accelerator, cfg.output_dir, update, checkpointed, {"model": optimizer},
                                   {"model": scheduler}, {"kl_coef": kl_ctl.kl_coef}, keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    # Processes must end with the same weights (DDP, or hand-averaged gradients in shared-base mode); sharded
    # (FSDP2), each process holds its own slice of the one copy: nothing to compare.
    replica_diff = None if sharded else engine.replica_difference(train_params, accelerator)
    eval_after = run_eval() if eval_prompts else None
    if eval_after is not None:
        logger.log(eval_after, step=update)
    accelerator.wait_for_everyone()
    final_dir = os.path.join(cfg.output_dir, "final")
    value_dir = os.path.join(cfg.output_dir, "final_value") if value_model is not None else None
    if sharded:  # full weights gathered on rank 0, written as the same Hugging Face folders
        engine.save_final(accelerator, policy, tokenizer, final_dir, cfg.model)
        value_state = engine.full_state(value_net) if value_net is not None else None
        if accelerator.is_main_process and value_net is not None:
            save_value(value_net, tokenizer, value_dir, value_state)
    elif accelerator.is_main_process:
        save_policy_and_value(raw_policy, accelerator.unwrap_model(value_model) if value_model is not None else None,
                              tokenizer, final_dir, value_dir, cfg)
    if accelerator.is_main_process:
        plot_metrics(cfg.output_dir)
    summary = {
        "stage": "ppo", "updates": update, "runtime_seconds": round(runtime, 2),
        "seconds_per_update": round(sum(update_seconds) / max(1, len(update_seconds)), 3) if update_seconds else None,
        "memory_mode": memory_mode, "peak_rss_mb": round(_peak_rss_mb(), 1), "value_init": value_note,
        "advantage": ppo.advantage, "samples_per_prompt": k_samples,
        "kl_coef": kl_ctl.kl_coef, "last": last_log, "eval_before": eval_before, "eval_after": eval_after,
        "trainable_parameters": {"policy": trainable_policy, "value": trainable_value},
        "total_parameters": total_policy, "num_processes": world, "replica_max_abs_difference": replica_diff,
        "prompts": len(train_prompts),
        "rows": {"train": train_rows.to_dict(), **({"eval": eval_rows.to_dict()} if eval_rows else {})},
        "final_dir": final_dir, "value_dir": value_dir,
    }
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    engine.end_training(accelerator)
    return summary


def save_policy_and_value(policy, value_model, tokenizer, final_dir: str, value_dir: Optional[str],
                          cfg: PPOConfig) -> None:
    """final/: the policy (full model, or LoRA adapter [+ final_merged/]); final_value/: the value model.

    The value model is a one-output sequence-classification model (or its LoRA adapter),
    loadable with ``AutoModelForSequenceClassification``. In shared-base mode it is the
    "value" LoRA adapter of the policy's base plus ``value_head.safetensors``. Critic-free
    runs (value_model None) write final/ only.
    """
    if value_model is None:
        pass
    elif isinstance(value_model.model, AdapterHead):
        save_adapter_head(policy, value_model.model, value_dir, tokenizer)
    else:
        save_value(value_model.model, tokenizer, value_dir)
    if is_peft(policy):  # final/ holds the policy's adapter only, not the shared value/reward adapters
        for name in [n for n in policy.peft_config if n != "default"]:
            policy.delete_adapter(name)
    save_model(policy, tokenizer, final_dir, cfg.model)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
