"""Run by tests/test_sharding.py under two gloo processes:

    accelerate launch --multi_gpu --num_processes 2 tests/sharding_worker.py OUT.json

PPO's pieces on FSDP2-sharded models, each checked against an unsharded copy that every
process also holds: generation with sharded weights (processes generating different
numbers of tokens), a sharded frozen reference and reward model, and two PPO minibatch
updates of a sharded policy and value model on a fixed rollout. Writes what it measured
to OUT.json on rank 0.
"""

import copy
import json
import sys

import torch

from alignkit import engine, sharding
from alignkit.config import LogConfig, ModelConfig, TrainConfig
from alignkit.losses import logprobs_from_logits, policy_loss, value_loss
from alignkit.modeling import load_model


class Value(torch.nn.Module):
    """Backbone + linear head: the head lives outside the Hugging Face model, like alignkit's value model."""

    def __init__(self, causal_lm):
        super().__init__()
        self.backbone = causal_lm.model
        self.head = torch.nn.Linear(causal_lm.config.hidden_size, 1)

    def forward(self, input_ids):
        return self.head(self.backbone(input_ids=input_ids).last_hidden_state).squeeze(-1)


def response_logprobs(model, ids, context):
    logits = model(input_ids=ids).logits[:, context - 1:-1]
    return logprobs_from_logits(logits, ids[:, context:])


def ppo_loss(policy, value, ids, context, old_logprobs, old_values, advantages, returns):
    mask = torch.ones_like(advantages)
    pg, _, _ = policy_loss(response_logprobs(policy, ids, context), old_logprobs, advantages, mask, 0.2)
    vf, _ = value_loss(value(ids)[:, context - 1:-1], old_values, returns, mask, 0.2)
    return pg + 0.1 * vf


def main(out_path):
    train = TrainConfig(sharding="fsdp2", learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                        max_grad_norm=0.5)
    accelerator = engine.make_accelerator(train, LogConfig(), "/tmp")
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {"world": world}
    torch.manual_seed(0)
    policy = load_model(ModelConfig(), task="causal-lm")
    plain_policy = copy.deepcopy(policy)
    plain_value = Value(copy.deepcopy(policy))
    value = copy.deepcopy(plain_value)
    reference = load_model(ModelConfig(), task="causal-lm", trainable=False)
    reward = load_model(ModelConfig(), task="reward", pad_token_id=0, trainable=False)
    plain_reward = copy.deepcopy(reward)
    for m in (policy, value, reference, reward):
        engine.shard(m, accelerator, train)
    results["sharded_dtensors"] = all(isinstance(p, torch.distributed.tensor.DTensor)
                                      for m in (policy, value, reference, reward) for p in m.parameters())
    n_full = sum(p.numel() for p in plain_policy.parameters())
    n_local = sum(p.to_local().numel() for p in policy.parameters())
    results["local_share"] = n_local / n_full

    # 1. generate: rank r asks for a different number of tokens; the gathered weights need no collectives.
    query = torch.tensor([[1, 5, 9, 11, 7]])
    with engine.gathered(policy):
        gen = policy.generate(query, max_new_tokens=4 + 3 * rank, do_sample=False, pad_token_id=0)
    expected = plain_policy.generate(query, max_new_tokens=4 + 3 * rank, do_sample=False, pad_token_id=0)
    results["generate_equal"] = bool(torch.equal(gen, expected))
    results["resharded_after_generate"] = all(isinstance(p, torch.distributed.tensor.DTensor)
                                              and p.to_local().numel() < p.numel() for p in policy.parameters()
                                              if p.ndim == 2)

    # 2. a fixed rollout of 4 sequences (context 5, response 6): the global batch; this rank takes its half.
    g = torch.Generator().manual_seed(1)
    b_ids = torch.randint(4, 60, (4, 11), generator=g)
    context = 5
    with torch.no_grad():
        b_ref_logprobs = response_logprobs(plain_policy, b_ids, context)
        b_old_logprobs = b_ref_logprobs + 0.05 * torch.randn(b_ref_logprobs.shape, generator=g)
        b_old_values = plain_value(b_ids)[:, context - 1:-1]
        b_advantages = torch.randn(b_ref_logprobs.shape, generator=g)
        b_returns = b_old_values + b_advantages
        b_scores = plain_reward(input_ids=b_ids).logits[:, 0]
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    with torch.no_grad():
        ref_sharded = response_logprobs(reference, b_ids[mine], context)
        score_sharded = reward(input_ids=b_ids[mine]).logits[:, 0]
    results["reference_max_diff"] = float((ref_sharded - b_ref_logprobs[mine]).abs().max())
    results["reward_max_diff"] = float((score_sharded - b_scores[mine]).abs().max())

    # 3. two PPO minibatch updates (2 sequences each, 1 per process), sharded vs the unsharded copy.
    def make_opt(models):
        params = [(n, p) for m in models for n, p in m.named_parameters()]
        return engine.make_optimizer(None, train, 10, params=params)

    opt, sched = make_opt([policy, value])
    plain_opt, plain_sched = make_opt([plain_policy, plain_value])
    results["losses"], results["plain_losses"] = [], []
    for mb_rows in ([0, 2], [1, 3]):
        mb = torch.tensor(mb_rows)
        args = (b_ids[mb], context, b_old_logprobs[mb], b_old_values[mb], b_advantages[mb], b_returns[mb])
        local = slice(rank * 2 // world, (rank + 1) * 2 // world)
        loss = ppo_loss(policy, value, *(a if isinstance(a, int) else a[local] for a in args))
        loss.backward()  # FSDP2 averages the gradients over processes: equal token counts -> the global mean
        norm = engine.optimizer_step(accelerator, list(policy.parameters()) + list(value.parameters()), opt, sched,
                                     train.max_grad_norm)
        results["losses"].append(float(accelerator.reduce(loss.detach(), "mean")))
        plain_loss = ppo_loss(plain_policy, plain_value, *args)
        plain_loss.backward()
        plain_norm = engine.optimizer_step(accelerator, list(plain_policy.parameters()) +
                                           list(plain_value.parameters()), plain_opt, plain_sched, train.max_grad_norm)
        results["plain_losses"].append(float(plain_loss.detach()))
        results.setdefault("grad_norms", []).append([norm, plain_norm])
    full = {**{f"policy.{k}": v for k, v in sharding.full_state_dict(policy).items()},
            **{f"value.{k}": v for k, v in sharding.full_state_dict(value).items()}}
    if rank == 0:
        plain = {**{f"policy.{k}": v for k, v in plain_policy.state_dict().items()},
                 **{f"value.{k}": v for k, v in plain_value.state_dict().items()}}
        start = load_model(ModelConfig(), task="causal-lm").state_dict()
        results["update_max_diff"] = max(float((full[k] - plain[k]).abs().max()) for k in full)
        results["update_size"] = max(float((plain[f"policy.{k}"] - v).abs().max()) for k, v in start.items())
        results["compared_tensors"] = len(full)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
