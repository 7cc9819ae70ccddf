"""Critic-free advantages in PPO's loop: ppo.advantage rloo | grpo | reinforce_pp, ppo.kl_in_loss.

Run: pytest -q tests/test_ppo_critic_free.py          (the gold-gain test is marked slow)
"""

import json
import math
import os
import shutil

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.losses import kl_loss, reinforce_pp_advantages
from alignkit.ppo import PPOConfig, PPOSettings, train_ppo
from alignkit.ppo_update import compute_advantages
from alignkit.sft import SFTConfig, train_sft
from test_ppo import tiny_cfg

# ----------------------------------------------------------------------------- bad input


def test_group_baselines_need_two_samples_per_prompt(tmp_path):
    for advantage in ("grpo", "rloo"):
        with pytest.raises(ConfigError, match=f"ppo.advantage={advantage} needs ppo.samples_per_prompt >= 2"):
            tiny_cfg(tmp_path, f"ppo.advantage={advantage}")  # samples_per_prompt defaults to 1
        with pytest.raises(ConfigError, match=f"ppo.advantage={advantage} needs ppo.samples_per_prompt >= 2"):
            tiny_cfg(tmp_path, f"ppo.advantage={advantage}", "ppo.samples_per_prompt=1")
    with pytest.raises(ConfigError, match="ppo.advantage: must be one of gae, rloo, grpo, reinforce_pp"):
        tiny_cfg(tmp_path, "ppo.advantage=ppo2")
    with pytest.raises(ConfigError, match="rollout_batch_size=8 responses are not a whole number of prompts"):
        tiny_cfg(tmp_path, "ppo.advantage=rloo", "ppo.samples_per_prompt=3")
    tiny_cfg(tmp_path, "ppo.advantage=reinforce_pp")  # no group baseline: one sample per prompt is fine


# ----------------------------------------------------------------------------- maths, by hand


def test_kl_loss_is_the_masked_mean_of_k3():
    logprobs = torch.tensor([[-1.0, -2.0, 50.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -50.0]])  # the last token is padding: garbage there
    mask = torch.tensor([[True, True, False]])
    # log ratio 0.5 and 0: k3 = exp(-0.5) - 1 + 0.5 = 0.1065307 and 0; mean over 2 tokens = 0.0532653
    assert kl_loss(logprobs, ref_logprobs, mask).item() == pytest.approx((math.exp(-0.5) - 0.5) / 2, rel=1e-6)
    lp = logprobs.clone().requires_grad_(True)
    kl_loss(lp, ref_logprobs, mask).backward()
    # d/dlogp of (exp(ref - logp) + logp - ref) / 2 = (1 - exp(ref - logp)) / 2: (1 - e^-0.5) / 2, 0, 0 on padding
    torch.testing.assert_close(lp.grad, torch.tensor([[(1 - math.exp(-0.5)) / 2, 0.0, 0.0]]))


# Two prompts x k = 2 samples, 2 tokens each; the second response has one token. KL 0.5 on every token.
SCORES = torch.tensor([1.0, 3.0, 0.0, 4.0])
MASK = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
KL = torch.full((4, 2), 0.5)


def test_rloo_advantage_is_the_score_minus_the_other_samples_with_the_kl_in_the_reward():
    ppo = PPOSettings(advantage="rloo", samples_per_prompt=2, rollout_batch_size=4, num_minibatches=1)
    advantages, returns, non_score = compute_advantages(ppo, SCORES, KL, 0.2, MASK)
    # Reward per response: score - 0.2 * 0.5 per token: 1 - 0.2 = 0.8, 3 - 0.1 = 2.9, 0 - 0.2 = -0.2, 4 - 0.2 = 3.8.
    # Leave-one-out with k = 2: A = r - r_other: -2.1, 2.1, -4.0, 4.0, on every real token.
    expected = torch.tensor([[-2.1, -2.1], [2.1, 0.0], [-4.0, -4.0], [4.0, 4.0]])
    torch.testing.assert_close(advantages, expected)
    assert returns is None
    torch.testing.assert_close(non_score, torch.tensor([[-0.1, -0.1], [-0.1, 0.0], [-0.1, -0.1], [-0.1, -0.1]]))


def test_grpo_with_kl_in_loss_leaves_the_kl_out_of_the_reward():
    ppo = PPOSettings(advantage="grpo", samples_per_prompt=2, rollout_batch_size=4, num_minibatches=1,
                      kl_in_loss=True)
    advantages, _, non_score = compute_advantages(ppo, SCORES, KL, 0.2, MASK)
    # Rewards are the scores alone: groups [1, 3] and [0, 4]. Centred: -1, 1 and -2, 2; unbiased std of two
    # values = |difference| / sqrt(2): 1.414214 and 2.828427 (+ eps 1e-4). A = -0.707057, 0.707057, -0.707082, ...
    a, b = 1 / (2 ** 0.5 + 1e-4), 2 / (8 ** 0.5 + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([[-a, -a], [a, 0.0], [-b, -b], [b, b]]))
    # The KL penalty is still reported (objective/non_score_reward), only not optimised through the reward.
    assert non_score.sum().item() == pytest.approx(-0.7)


def test_dr_grpo_does_not_divide_by_the_group_std():
    ppo = PPOSettings(advantage="grpo", samples_per_prompt=2, rollout_batch_size=4, num_minibatches=1,
                      kl_in_loss=True, scale_by_std=False)
    advantages, _, _ = compute_advantages(ppo, SCORES, KL, 0.2, MASK)
    # Groups [1, 3] and [0, 4] minus their means 2 and 2: -1, 1, -2, 2.
    torch.testing.assert_close(advantages, torch.tensor([[-1.0, -1.0], [1.0, 0.0], [-2.0, -2.0], [2.0, 2.0]]))


def test_reinforce_pp_whitens_the_kl_penalised_returns():
    ppo = PPOSettings(advantage="reinforce_pp", rollout_batch_size=4, num_minibatches=1)
    advantages, returns, _ = compute_advantages(ppo, SCORES, KL, 0.2, MASK)
    # Per-token rewards: -0.1 on each token + the score on the last one:
    # [-0.1, 0.9], [2.9, 0], [-0.1, -0.1], [-0.1, 3.9]
    rewards = torch.tensor([[-0.1, 0.9], [2.9, 0.0], [-0.1, -0.1], [-0.1, 3.9]])
    torch.testing.assert_close(advantages, reinforce_pp_advantages(rewards, MASK))
    assert returns is None


# ----------------------------------------------------------------------------- runs without a value model


@pytest.fixture
def no_value_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a critic-free run loaded a value model")

    monkeypatch.setattr("alignkit.ppo.load_value_model", refuse)


def _rows(cfg):
    return [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("advantage,k", [("rloo", 2), ("reinforce_pp", 1)])
def test_critic_free_run_has_no_value_model(tmp_path, no_value_model, advantage, k):
    cfg = tiny_cfg(tmp_path, f"ppo.advantage={advantage}", f"ppo.samples_per_prompt={k}", "train.max_steps=1")
    summary = train_ppo(cfg)
    assert summary["trainable_parameters"]["value"] == 0 and summary["value_dir"] is None
    assert summary["advantage"] == advantage and summary["samples_per_prompt"] == k
    assert os.path.exists(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    assert not os.path.exists(os.path.join(cfg.output_dir, "final_value"))
    last = _rows(cfg)[-1]
    for key in ("objective/score", "objective/kl", "objective/gold_reward", "loss/policy", "policy/clipfrac",
                "policy/entropy", "rollout/response_length"):
        assert key in last, key
    assert "loss/value" not in last and "value/explained_variance" not in last


def test_grpo_kl_in_loss_resume_matches_uninterrupted(tmp_path, no_value_model):
    from safetensors.torch import load_file

    args = ("ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.kl_in_loss=true", "ppo.kl_estimator=k3",
            "train.max_steps=3", "train.save_every=1")
    full = tiny_cfg(tmp_path / "a", *args)
    train_ppo(full)
    rows = _rows(full)
    assert rows[-1]["loss/kl"] > 0 and "loss/value" not in rows[-1]
    # A checkpoint holds the policy only: there is no value model to save or restore.
    assert sorted(f for f in os.listdir(os.path.join(full.output_dir, "checkpoint-2")) if f.endswith(".safetensors")) \
        == ["policy.safetensors"]

    part = tiny_cfg(tmp_path / "b", *args, "train.resume=true")
    os.makedirs(part.output_dir)
    shutil.copytree(os.path.join(full.output_dir, "checkpoint-1"), os.path.join(part.output_dir, "checkpoint-1"))
    train_ppo(part)
    a = load_file(os.path.join(full.output_dir, "final/model.safetensors"))
    b = load_file(os.path.join(part.output_dir, "final/model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


def test_shipped_critic_free_configs_load():
    from conftest import ROOT

    for name, advantage in (("tiny_rloo.yaml", "rloo"), ("tiny_grpo.yaml", "grpo")):
        cfg = load_config(PPOConfig, os.path.join(ROOT, "configs", "ppo", name))
        assert cfg.ppo.advantage == advantage and cfg.ppo.samples_per_prompt >= 2


# ----------------------------------------------------------------------------- gold reward gain


@pytest.mark.slow
def test_rloo_raises_held_out_gold_reward(tmp_path):
    """As tests/test_ppo_gain.py, with RLOO (k = 4) and no value model: the same responses per update."""
    train_sft(load_config(SFTConfig, data={
        "data": {"train_files": ["builtin:sft:train:800"], "max_length": 64},
        "train": {"max_steps": 60, "per_device_batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.05,
                  "log_every": 20},
        "log": {"progress": False}, "output_dir": str(tmp_path / "sft")}))
    cfg = load_config(PPOConfig, data={
        "model": {"name_or_path": str(tmp_path / "sft" / "final")},
        "data": {"train_files": ["builtin:prompts:train:256"], "eval_files": ["builtin:prompts:eval"],
                 "max_length": 32},
        "train": {"max_steps": 16, "per_device_batch_size": 32, "learning_rate": 5e-4, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "log_every": 4, "seed": 0},
        "log": {"progress": False},
        "ppo": {"rollout_batch_size": 32, "num_minibatches": 2, "ppo_epochs": 4, "response_length": 24,
                "eval_samples": 128, "kl_target": 6.0, "advantage": "rloo", "samples_per_prompt": 4},
        "reward": {"sources": [{"name_or_path": "builtin:gold"}]},
        "output_dir": str(tmp_path / "rloo")})
    summary = train_ppo(cfg)
    before, after = summary["eval_before"], summary["eval_after"]
    gain = after["eval/gold_reward"] - before["eval/gold_reward"]
    # A standard error of a 128-sample mean is ~0.15 here; ask for a gain of about half an SFT std.
    assert gain > 0.5 * before["eval/gold_reward_std"], (before, after)
    assert after["eval/kl"] < 3 * cfg.ppo.kl_target
    assert summary["trainable_parameters"]["value"] == 0


@pytest.mark.slow
def test_grpo_with_two_processes_under_accelerate_launch(tmp_path):
    """DDP over the policy alone: each process samples its own prompts k times, both end with the same weights."""
    from conftest import ACCELERATE, ROOT, run_processes

    out = tmp_path / "two"
    run = run_processes([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "scripts/train_ppo.py"),
                         "--config", os.path.join(ROOT, "configs/ppo/tiny_grpo.yaml"),
                         "--model.name_or_path=builtin:tiny", "--data.train_files=[builtin:prompts:train:32]",
                         "--data.eval_files=[]", "--ppo.eval_samples=0", "--ppo.rollout_batch_size=8",
                         "--ppo.samples_per_prompt=4", "--train.per_device_batch_size=8", "--ppo.response_length=8",
                         "--ppo.ppo_epochs=1", "--train.max_steps=2", "--train.save_every=0", "--train.eval_every=0",
                         "--log.progress=false", f"--output_dir={out}"])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["num_processes"] == 2 and summary["replica_max_abs_difference"] == 0.0
    assert summary["trainable_parameters"]["value"] == 0 and "loss/value" not in summary["last"]
    assert summary["last"]["loss/kl"] > 0
