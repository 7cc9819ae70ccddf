"""The PPO update: advantages from a rollout, and the clipped losses on one of its minibatches.

Phase 4 (``compute_advantages``: per-token rewards with the KL penalty, then GAE, RLOO, GRPO or
REINFORCE++; Schulman et al. 2015, Ahmadian et al. 2024, Shao et al. 2024, Hu 2025) and phase 5
(``ppo_minibatch_loss`` on a typed ``Minibatch``) of ``alignkit.ppo.train_ppo``; the maths are
the pure functions of :mod:`alignkit.losses`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from alignkit.losses import (
    entropy_from_logits,
    gae_advantages,
    grpo_advantages,
    kl_loss,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)
from alignkit.rollout import forward_response

if TYPE_CHECKING:
    from alignkit.ppo import PPOSettings


@dataclass
class Minibatch:
    """What a PPO epoch reads of the rollout: (B, P + R) sequence tensors and (B, R) per-response-token ones."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # rollout policy log-probs (the ratio's denominator)
    ref_logprobs: torch.Tensor  # reference log-probs (ppo.kl_in_loss)
    advantages: torch.Tensor
    values: Optional[torch.Tensor] = None  # rollout values (the value clip's centre); None without a critic
    returns: Optional[torch.Tensor] = None

    def select(self, idx: torch.Tensor) -> "Minibatch":
        return Minibatch(*(None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                           for f in dataclasses.fields(self)))


class StepStats(NamedTuple):
    """Statistics of one PPO minibatch step (logged averaged over the update); None: not computed."""

    policy_loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    entropy: torch.Tensor
    value_loss: Optional[torch.Tensor] = None
    value_clipfrac: Optional[torch.Tensor] = None
    kl_loss: Optional[torch.Tensor] = None

    def metrics(self) -> dict:
        named = {"loss/policy": self.policy_loss, "policy/clipfrac": self.clipfrac, "policy/approx_kl": self.approx_kl,
                 "policy/entropy": self.entropy, "loss/value": self.value_loss, "value/clipfrac": self.value_clipfrac,
                 "loss/kl": self.kl_loss}
        return {k: v for k, v in named.items() if v is not None}


def ppo_minibatch_loss(policy, value_model, mb: Minibatch, context_length: int, ppo: PPOSettings, kl_coef: float):
    """Clipped policy loss [+ vf_coef * clipped value loss] [+ kl_coef * k3 KL] on one minibatch -> (loss, StepStats).

    ``value_model`` is None for the critic-free estimators.
    """
    logits, new_logprobs = forward_response(policy, mb.input_ids, mb.attention_mask, mb.position_ids,
                                            context_length, ppo.temperature)
    pg_loss, pg_clipfrac, approx_kl = policy_loss(new_logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                                  ppo.clip_range)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.float() / ppo.temperature), mb.response_mask)
    loss, stats = pg_loss, StepStats(pg_loss.detach(), pg_clipfrac, approx_kl, entropy)
    if value_model is not None:
        new_values = value_model(mb.input_ids, mb.attention_mask, mb.position_ids)[:, context_length - 1:-1]
        vf_loss, vf_clipfrac = value_loss(new_values, mb.values, mb.returns, mb.response_mask, ppo.clip_range_value)
        loss = loss + ppo.vf_coef * vf_loss
        stats = stats._replace(value_loss=vf_loss.detach(), value_clipfrac=vf_clipfrac)
    if ppo.kl_in_loss:  # GRPO: beta * k3 KL to the reference in the loss, not in the reward
        kl_term = kl_loss(new_logprobs, mb.ref_logprobs, mb.response_mask)
        loss = loss + kl_coef * kl_term
        stats = stats._replace(kl_loss=kl_term.detach())
    return loss, stats


def compute_advantages(ppo: PPOSettings, b_scores, b_kl, kl_coef: float, response_mask, b_values=None):
    """Phase 4: per-token rewards, then the configured estimator -> (advantages, returns, non_score_reward).

    Shapes: b_scores (B,), b_kl / response_mask / b_values (B, T). The reward is -kl_coef * KL on each
    token plus the score on the last (with ppo.kl_in_loss the KL part is left out of it, but still
    returned as non_score_reward). gae: GAE on the value model's values, whitened; rloo / grpo: one
    advantage per response from its summed reward, given to each of its tokens; reinforce_pp:
    whitened returns. ``returns`` is None without a critic.
    """
    b_rewards, b_non_score = per_token_rewards(b_scores, b_kl, kl_coef, response_mask)
    if ppo.kl_in_loss:  # the KL penalty is logged (non_score_reward) but left out of the reward
        b_rewards = b_rewards - b_non_score
    if ppo.whiten_rewards:
        b_rewards = masked_whiten(b_rewards, response_mask, shift_mean=False)
    if ppo.advantage == "gae":
        b_advantages, b_returns = gae_advantages(b_rewards, b_values, response_mask, ppo.gamma, ppo.lam)
        return masked_whiten(b_advantages, response_mask), b_returns, b_non_score
    if ppo.advantage == "reinforce_pp":
        return reinforce_pp_advantages(b_rewards, response_mask, ppo.gamma), None, b_non_score
    if ppo.advantage == "rloo":
        per_response = rloo_advantages(b_rewards.sum(-1), ppo.samples_per_prompt)
    else:
        per_response = grpo_advantages(b_rewards.sum(-1), ppo.samples_per_prompt, ppo.scale_by_std)
    mask = response_mask.bool()
    return torch.where(mask, per_response[:, None], torch.zeros_like(b_rewards)), None, b_non_score
