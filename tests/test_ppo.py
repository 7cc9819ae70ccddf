"""Tests for the PPO stage: rollout pieces, masking, reward sources, bad input, resume.

Run: pytest -q tests/test_ppo.py          (the gold-reward gain test is in tests/test_ppo_gain.py)
"""

import json
import os
import re
import textwrap

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.engine import TrainingError
from alignkit.modeling import ModelLoadError
from alignkit.ppo import PPOConfig, PPOSettings, reward_kl_estimator, train_ppo
from alignkit.ppo_update import Minibatch, ppo_minibatch_loss
from alignkit.rollout import left_pad, sequence_inputs, truncate_after_eos
from alignkit.value import ValueModel
from alignkit.rewards import ModelReward, RewardSourceConfig, build_reward
from alignkit.schema import DataError, load_examples
from alignkit.tokenization import unknown_token_share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(tmp_path, *overrides, data=None):
    """A few-second PPO run on the random built-in tiny model with the gold reward."""
    base = {
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"train_files": ["builtin:prompts:train:32"], "eval_files": [], "max_length": 32},
        "train": {"max_steps": 2, "per_device_batch_size": 8, "learning_rate": 1e-3, "log_every": 1,
                  "warmup_ratio": 0.0, "lr_scheduler": "constant"},
        "log": {"progress": False},
        "ppo": {"rollout_batch_size": 8, "num_minibatches": 2, "ppo_epochs": 2, "response_length": 8,
                "eval_samples": 0},
        "output_dir": str(tmp_path / "ppo"),
    }
    for k, v in (data or {}).items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(PPOConfig, data=base, overrides=list(overrides))


def make_reward_model(path, num_labels, head=None, seed=0):
    """A tiny sequence-classification reward model built from the built-in model folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.builtin import ensure_model

    src = ensure_model("builtin:tiny")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels)
    tok = AutoTokenizer.from_pretrained(src)
    model.config.pad_token_id = tok.pad_token_id
    if head is not None:
        model.config.alignkit_reward = head
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- rollout pieces


def test_truncate_after_eos_masks_everything_after_the_first_eos():
    eos, pad = 2, 0
    response = torch.tensor([[5, 6, 2, 7, 2],  # ends at position 2; 7 and the second EOS are cut
                             [5, 6, 7, 8, 9],  # never ends: all kept, ended=False
                             [2, 5, 5, 5, 5]])  # EOS first: a one-token response
    out, mask, ended = truncate_after_eos(response, eos, pad)
    assert out.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_sequence_inputs_positions_skip_left_padding():
    q, qm = left_pad([[7, 8], [9]], pad_id=0)  # [[7, 8], [0, 9]]
    r = torch.tensor([[3, 2], [4, 0]])
    rm = torch.tensor([[True, True], [True, False]])
    ids, att, pos = sequence_inputs(q, qm, r, rm)
    assert ids.tolist() == [[7, 8, 3, 2], [0, 9, 4, 0]]
    assert att.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 1, 1]]


def _tiny_policy_and_value():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.builtin import ensure_model

    src = ensure_model("builtin:tiny")
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(src)
    value = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    return policy, ValueModel(value)


def test_masked_tokens_change_nothing_in_the_ppo_loss():
    """Left padding and post-EOS tokens (ids and rollout statistics) leave loss and gradients unchanged."""

    policy, value = _tiny_policy_and_value()
    ppo = PPOSettings(temperature=0.7, kl_in_loss=True)  # the KL loss term must ignore padding too
    q, qm = left_pad([[4, 10, 11, 12, 6], [4, 13, 6]], pad_id=0)
    resp = torch.tensor([[20, 21, 2, 0, 0], [22, 23, 24, 25, 2]])
    resp, rmask, _ = truncate_after_eos(resp, 2, pad_id=0)
    ids, att, pos = sequence_inputs(q, qm, resp, rmask)
    g = torch.Generator().manual_seed(1)
    stats = {k: torch.randn(2, 5, generator=g) for k in ("logprobs", "ref_logprobs", "values", "advantages", "returns")}
    stats["logprobs"], stats["ref_logprobs"] = -stats["logprobs"].abs(), -stats["ref_logprobs"].abs()

    def loss_and_grads(input_ids, rollout):
        policy.zero_grad()
        value.zero_grad()
        mb = Minibatch(input_ids=input_ids, attention_mask=att, position_ids=pos, response_mask=rmask, **rollout)
        loss, _ = ppo_minibatch_loss(policy, value, mb, q.shape[1], ppo, kl_coef=0.1)
        loss.backward()
        grads = [p.grad.clone() for p in list(policy.parameters()) + list(value.parameters()) if p.grad is not None]
        return loss.detach(), grads

    loss_a, grads_a = loss_and_grads(ids, stats)
    # Scramble every masked position: left-pad ids, post-EOS ids and all rollout numbers there.
    ids_b = ids.clone()
    hidden = torch.cat([~qm.bool(), ~rmask], dim=1)
    ids_b[hidden] = torch.randint(7, 40, (int(hidden.sum()),), generator=g)
    garbage = {k: torch.where(rmask, v, torch.full_like(v, 1e4)) for k, v in stats.items()}
    loss_b, grads_b = loss_and_grads(ids_b, garbage)
    assert torch.isfinite(loss_a)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_response_logprobs_equal_an_independent_computation():
    """forward_response (left padding, position ids, LM head on the response positions only) gives, for every
    response token, log softmax(logits / T) of that token computed from its own unpadded prefix alone."""
    from alignkit.rollout import _takes_logits_to_keep, forward_response

    policy, _ = _tiny_policy_and_value()
    policy.eval()
    assert _takes_logits_to_keep(policy)
    prompts = [[4, 10, 11, 12, 6], [4, 13, 6]]
    q, qm = left_pad(prompts, pad_id=0)
    resp, rmask, _ = truncate_after_eos(torch.tensor([[20, 21, 2, 0], [22, 23, 24, 2]]), 2, pad_id=0)
    ids, att, pos = sequence_inputs(q, qm, resp, rmask)
    T = 0.7
    with torch.no_grad():
        _, logprobs = forward_response(policy, ids, att, pos, q.shape[1], T)
        for b, prompt in enumerate(prompts):
            tokens = resp[b][rmask[b]].tolist()
            for t, token in enumerate(tokens):
                prefix = torch.tensor([prompt + tokens[:t]])
                expected = torch.log_softmax(policy(input_ids=prefix).logits[0, -1].double() / T, -1)[token]
                assert abs(logprobs[b, t].item() - expected.item()) < 1e-4, (b, t)


# ----------------------------------------------------------------------------- reward sources


def test_alignkit_reward_model_applies_offset_scale_and_weights(tmp_path):
    head = {"aspects": ["helpfulness", "harmlessness"], "weights": [1.0, 0.5], "offset": [0.2, -0.1],
            "scale": [2.0, 0.5]}
    path = make_reward_model(tmp_path / "rm", 2, head)
    rm = ModelReward(RewardSourceConfig(name_or_path=path))
    prompts, responses = ["review the pizza", "describe the movie"], ["the pizza was great .", "the plot was bad ."]
    raw = rm.raw_scores(prompts, responses)
    assert raw.shape == (2, 2)
    # reward = 1.0 * (raw_h - 0.2) / 2.0 + 0.5 * (raw_s + 0.1) / 0.5
    expected = (raw[:, 0] - 0.2) / 2.0 + 0.5 * (raw[:, 1] + 0.1) / 0.5
    torch.testing.assert_close(rm(prompts, responses), expected)
    # Same as HF's own pooling at the last token (the built-in pad token differs from EOS).
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = rm.encode(prompts[0], responses[0])
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], raw[0], atol=1e-5, rtol=1e-5)


def test_weighted_sources_and_python_function(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text("def length(prompts, responses):\n"
                                          "    return [float(len(r.split())) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward([RewardSourceConfig(name_or_path="builtin:gold", weight=2.0),
                           RewardSourceConfig(name_or_path="myreward:length", weight=-0.5)])
    # gold("the pizza was great .") = +1 (great) + 0.5 (on topic) = 1.5; 5 words -> 2 * 1.5 - 0.5 * 5 = 0.5
    out = reward(["review the pizza"], ["the pizza was great ."])
    torch.testing.assert_close(out, torch.tensor([0.5]))


def test_reward_model_outputs_must_match_configured_aspects(tmp_path):
    path = make_reward_model(tmp_path / "rm3", 3)
    with pytest.raises(ModelLoadError, match=r"3 output\(s\).*aspects is \['helpfulness', 'harmlessness'\]"):
        build_reward([RewardSourceConfig(name_or_path=path, aspects=["helpfulness", "harmlessness"])])
    with pytest.raises(ModelLoadError, match="3 outputs but reward.sources.aspects is empty"):
        build_reward([RewardSourceConfig(name_or_path=path)])
    head = {"aspects": ["helpfulness"], "weights": [1.0], "offset": [0.0], "scale": [1.0]}
    bad = make_reward_model(tmp_path / "rm_bad_head", 2, head)
    with pytest.raises(ModelLoadError, match="2 outputs but alignkit_reward lists 1 aspects"):
        build_reward([RewardSourceConfig(name_or_path=bad)])


# ----------------------------------------------------------------------------- bad input


def test_prompt_rows_with_answers_but_no_prompt(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "review the pizza"}) + "\n"
                 + json.dumps({"answers": ["the pizza was great ."]}) + "\n"
                 + json.dumps({"completion": "the movie was bad ."}) + "\n")
    cfg = tiny_cfg(tmp_path, data={"data": {"train_files": [str(f)]}})
    with pytest.raises(DataError) as e:
        train_ppo(cfg)
    assert f"{f}:2: prompt: missing" in str(e.value) and f"{f}:3: prompt: missing" in str(e.value)
    assert not os.path.exists(os.path.join(cfg.output_dir, "final"))


def test_rollout_batch_not_divisible_into_minibatches(tmp_path):
    with pytest.raises(ConfigError, match="rollout_batch_size=10 is not divisible into ppo.num_minibatches=4"):
        tiny_cfg(tmp_path, "ppo.rollout_batch_size=10", "ppo.num_minibatches=4")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 does not divide a minibatch of 4"):
        tiny_cfg(tmp_path, "train.gradient_accumulation_steps=3")


def test_reference_with_another_vocabulary_is_refused(tmp_path):
    from alignkit.builtin import build_model

    model, tok = build_model("tiny", vocab_size=300)  # same tokenizer file, different embedding table
    model.save_pretrained(tmp_path / "ref")
    cfg = tiny_cfg(tmp_path, f"ppo.reference={tmp_path / 'ref'}")
    with pytest.raises(ModelLoadError, match="vocabulary of 300 tokens, the policy has"):
        train_ppo(cfg)


def test_non_finite_reward_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "nanreward.py").write_text(textwrap.dedent("""
        CALLS = [0]
        def score(prompts, responses):
            CALLS[0] += 1
            return [float("nan") if CALLS[0] >= 3 else 0.0 for _ in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_cfg(tmp_path, "train.max_steps=5", "train.save_every=1",
                   data={"reward": {"sources": [{"name_or_path": "nanreward:score"}]}})
    with pytest.raises(TrainingError, match=r"non-finite reward at step 2.*checkpoint-2"):
        train_ppo(cfg)
    assert os.path.isdir(os.path.join(cfg.output_dir, "checkpoint-2"))


# ----------------------------------------------------------------------------- runs


def test_adaptive_kl_coef_stops_at_its_floor(tmp_path):
    # kl_target 1000: the KL is far below it, so the controller's error is clipped to -0.2 and each update
    # multiplies beta by 1 - 0.2 * 8 / 256 = 0.99375: 0.05 -> 0.0496875 -> 0.04937695 (under the floor 0.0495).
    summary = train_ppo(tiny_cfg(tmp_path, "ppo.kl_target=1000", "ppo.kl_coef_min=0.0495"))
    assert summary["kl_coef"] == pytest.approx(0.0495)
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path / "ppo"), "metrics.jsonl"))]
    assert [r["train/kl_coef"] for r in rows if "train/kl_coef" in r] == pytest.approx([0.0496875, 0.0495])
    with pytest.raises(ConfigError, match="ppo.kl_coef_min: must be between 0 and ppo.kl_coef=0.05"):
        tiny_cfg(tmp_path, "ppo.kl_coef_min=0.1")
    # The shipped floor is the library's default, not only the pipeline YAMLs'; a lower starting beta
    # names it, and a fixed beta has no floor to check.
    assert PPOSettings().kl_coef_min == 0.03
    with pytest.raises(ConfigError, match=r"got 0.03 \(the adaptive controller's floor, default 0.03"):
        tiny_cfg(tmp_path, "ppo.kl_coef=0.01")
    assert tiny_cfg(tmp_path, "ppo.kl_coef=0.01", "ppo.adaptive_kl=false").ppo.kl_coef == 0.01


def test_k3_stays_out_of_the_reward_unless_asked_for(tmp_path, capsys):
    # Why: tests/test_losses.py::test_only_k1_as_a_detached_reward_penalty_has_the_kl_gradient.
    assert reward_kl_estimator(PPOSettings(kl_estimator="k3")) == "k1"
    assert reward_kl_estimator(PPOSettings(kl_estimator="k3", kl_k3_in_reward=True)) == "k3"
    assert reward_kl_estimator(PPOSettings(kl_estimator="k3", kl_in_loss=True)) == "k3"  # logged only
    with pytest.raises(ConfigError, match="ppo.kl_k3_in_reward: .* set ppo.kl_estimator: k3 too"):
        tiny_cfg(tmp_path, "ppo.kl_k3_in_reward=true")
    train_ppo(tiny_cfg(tmp_path, "train.max_steps=1", "ppo.kl_estimator=k3"))
    assert "ppo.kl_estimator=k3: the reward's KL penalty stays k1" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path / "ppo"), "metrics.jsonl"))]
    # First update: policy = reference (exactly 0 on CPU; a GPU's kernels may differ between the two passes by ~1e-13).
    assert [r["objective/kl_k3"] for r in rows if "objective/kl_k3" in r] == [pytest.approx(0.0, abs=1e-9)]


def test_short_run_writes_outputs_and_resume_matches_uninterrupted(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    full = tiny_cfg(tmp_path / "a", "train.max_steps=3", "train.save_every=1")
    summary = train_ppo(full)
    out = full.output_dir
    for name in ("final/model.safetensors", "final_value/model.safetensors", "metrics.jsonl", "curves.png",
                 "summary.json", "config.yaml"):
        assert os.path.exists(os.path.join(out, name)), name
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for key in ("objective/score", "objective/kl", "objective/non_score_reward", "policy/entropy",
                "policy/clipfrac", "policy/approx_kl", "loss/value", "value/explained_variance",
                "rollout/response_length", "rollout/eos_share", "objective/gold_reward"):
        assert key in rows[-1], key
    assert summary["updates"] == 3
    assert summary["rows"]["train"]["read"] == summary["rows"]["train"]["used"] > 0  # every row accounted for
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "final_value"))
    assert value.config.num_labels == 1

    # Interrupted after update 1 (its checkpoint), resumed to 3: the same policy as the run above.
    part = tiny_cfg(tmp_path / "b", "train.max_steps=3", "train.save_every=1")
    os.makedirs(part.output_dir)
    import shutil

    shutil.copytree(os.path.join(out, "checkpoint-1"), os.path.join(part.output_dir, "checkpoint-1"))
    part.train.resume = True
    train_ppo(part)
    a = load_file(os.path.join(out, "final/model.safetensors"))
    b = load_file(os.path.join(part.output_dir, "final/model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_lora_run_uses_the_adapter_off_policy_as_reference(tmp_path):
    """With LoRA the reference is the policy with its adapter off: after updates the KL to it is non-zero
    and equals the KL to an explicitly loaded frozen copy of the base on the same samples."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from alignkit.losses import sequence_kl
    from alignkit.modeling import load_tokenizer, resolve_path
    from alignkit.rollout import load_prompts, rollout

    cfg = tiny_cfg(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=3",
                   "train.learning_rate=1e-2")
    summary = train_ppo(cfg)
    assert summary["memory_mode"] == "lora"
    final = os.path.join(cfg.output_dir, "final")
    assert os.path.exists(os.path.join(final, "adapter_config.json"))
    assert os.path.exists(os.path.join(cfg.output_dir, "final_value", "adapter_config.json"))
    policy = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    frozen_copy = AutoModelForCausalLM.from_pretrained(resolve_path("builtin:tiny")).eval()
    tok = load_tokenizer(cfg.model, padding_side="left")
    prompts, _ = load_prompts(["builtin:prompts:eval:16"], tok, cfg.data, seed=0)
    reward = build_reward([RewardSourceConfig(name_or_path="builtin:gold")])
    runs = []
    for reference in (None, frozen_copy):
        torch.manual_seed(3)
        runs.append(rollout(policy, reference, reward, prompts, tok, 8, 1.0, 8, "cpu"))
    off, copy = runs
    assert torch.equal(off.response, copy.response)
    torch.testing.assert_close(off.ref_logprobs, copy.ref_logprobs, atol=1e-5, rtol=1e-5)
    kl = sequence_kl(off.logprobs, off.ref_logprobs, off.response_mask)
    assert kl.abs().mean() > 1e-3


def test_value_model_starts_from_the_reward_model(tmp_path):
    head = {"aspects": ["helpfulness", "harmlessness"], "weights": [1.0, 0.5], "offset": [0.0, 0.0],
            "scale": [2.0, 1.0]}
    path = make_reward_model(tmp_path / "rm", 2, head, seed=3)
    cfg = tiny_cfg(tmp_path, "train.max_steps=1", "train.learning_rate=0.0",
                   data={"reward": {"sources": [{"name_or_path": path}]}})
    summary = train_ppo(cfg)
    assert summary["value_init"] == f"reward model {path}"
    from safetensors.torch import load_file

    rm = load_file(os.path.join(path, "model.safetensors"))["score.weight"]
    v = load_file(os.path.join(cfg.output_dir, "final_value", "model.safetensors"))["score.weight"]
    # value head = 1.0 / 2.0 * W_helpfulness + 0.5 / 1.0 * W_harmlessness (lr 0: unchanged by training)
    torch.testing.assert_close(v, 0.5 * rm[0:1] + 0.5 * rm[1:2])


def test_shipped_ppo_configs_load():
    folder = os.path.join(ROOT, "configs", "ppo")
    files = [f for f in os.listdir(folder) if f.endswith(".yaml")]
    assert files
    for f in files:
        load_config(PPOConfig, os.path.join(folder, f))


def test_shared_base_trains_policy_and_value_adapters_on_one_base(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "ppo.shared_base=true",
                   "train.max_steps=2")
    summary = train_ppo(cfg)
    assert summary["memory_mode"] == "shared_base"
    policy = load_file(os.path.join(cfg.output_dir, "final", "adapter_model.safetensors"))
    value = load_file(os.path.join(cfg.output_dir, "final_value", "adapter_model.safetensors"))
    head = load_file(os.path.join(cfg.output_dir, "final_value", "value_head.safetensors"))
    # LoRA B matrices start at zero: non-zero means the adapter was trained; the value's by the value loss.
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in policy.items())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in value.items())
    assert head["weight"].abs().sum() > 0
    assert not os.path.exists(os.path.join(cfg.output_dir, "final", "value"))  # final/ is the policy only


@pytest.mark.parametrize("shared", [False, True])
def test_lora_on_a_4bit_base(tmp_path, shared):
    """4-bit base + LoRA: the run trains the adapter (it moves away from its zero-B start)."""
    from safetensors.torch import load_file

    cfg = tiny_cfg(tmp_path, "model.load_in_4bit=true", "model.lora.enabled=true", "model.lora.r=4",
                   f"ppo.shared_base={str(shared).lower()}", "train.max_steps=1")
    summary = train_ppo(cfg)
    assert summary["memory_mode"] == ("shared_base-4bit" if shared else "lora-4bit")
    assert torch.isfinite(torch.tensor(summary["last"]["loss/value"]))
    adapter = load_file(os.path.join(cfg.output_dir, "final", "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_lora_ppo_updates_move_the_policy_toward_the_advantages(quant):
    """QLoRA learns, not just runs: a few PPO steps on one fixed rollout of a 4-bit (or full-precision) LoRA
    policy raise the log-probs of tokens with positive advantage and lower those with negative advantage."""
    from alignkit.config import ModelConfig
    from alignkit.losses import policy_loss
    from alignkit.modeling import load_model
    from alignkit.rollout import forward_response

    cfg = ModelConfig(name_or_path="builtin:tiny", load_in_4bit=quant == "4bit")
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha = True, 8, 16
    torch.manual_seed(0)
    policy = load_model(cfg, task="causal-lm")
    q, qm = left_pad([[4, 10, 11, 12, 6], [4, 13, 6], [4, 20, 21, 6], [4, 9, 6]], pad_id=0)
    resp, rmask, _ = truncate_after_eos(torch.randint(7, 40, (4, 6), generator=torch.Generator().manual_seed(1)),
                                        2, pad_id=0)
    ids, att, pos = sequence_inputs(q, qm, resp, rmask)
    device = next(policy.parameters()).device  # 4-bit weights load onto the GPU where there is one
    ids, att, pos, rmask = ids.to(device), att.to(device), pos.to(device), rmask.to(device)
    P = q.shape[1]
    with torch.no_grad():
        old = forward_response(policy, ids, att, pos, P, 1.0)[1].float()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], device=device)[:, None].expand_as(old)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert params and all("lora" in n for n, p in policy.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(5):
        loss, *_ = policy_loss(forward_response(policy, ids, att, pos, P, 1.0)[1].float(), old, advantages, rmask,
                               clip_range=10.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        new = forward_response(policy, ids, att, pos, P, 1.0)[1].float()
    change = ((new - old) * rmask).sum(-1) / rmask.sum(-1)
    assert (change[[0, 2]] > 0.05).all() and (change[[1, 3]] < -0.05).all(), change


def test_ppo_ptx_mixes_in_the_sft_loss(tmp_path):
    """The ptx term changes the update: same seed, same rollouts, different weights with and without it."""
    from safetensors.torch import load_file

    weights = []
    for coef in (0.5, 0.0):
        cfg = tiny_cfg(tmp_path / str(coef), f"ppo.ptx_coef={coef}", "ppo.ptx_files=[builtin:sft:train:16]",
                       "train.max_steps=1")
        summary = train_ppo(cfg)
        assert (summary["last"].get("loss/ptx", 0) > 0) == (coef > 0)
        weights.append(load_file(os.path.join(cfg.output_dir, "final", "model.safetensors")))
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) > 1e-6
    with pytest.raises(ConfigError, match="ppo.ptx_files"):
        tiny_cfg(tmp_path, "ppo.ptx_coef=0.5")


def test_reward_model_with_another_tokenizer_reads_retokenized_text(tmp_path, capsys):
    """An RM whose token ids differ from the policy's: scored on its own tokens; value falls back to the policy.
    One that cannot read the prompts (its vocabulary lacks their words) gets a warning before training."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from alignkit.builtin import CHAT_TEMPLATE, ROLE_TOKENS, SPECIAL, vocabulary

    def word_level_rm(words, path):
        wl = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=SPECIAL["unk"]))
        wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
                                      eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"],
                                      additional_special_tokens=ROLE_TOKENS)
        tok.chat_template = CHAT_TEMPLATE
        torch.manual_seed(0)
        rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                        pad_token_id=tok.pad_token_id))
        rm.save_pretrained(path)
        tok.save_pretrained(path)
        return tok

    words = vocabulary()
    tok = word_level_rm(words[:4] + words[4:][::-1], tmp_path / "rm")  # same words, other ids
    reward = ModelReward(RewardSourceConfig(name_or_path=str(tmp_path / "rm")))
    ids = reward.encode("review the pizza", "the pizza was great .")
    assert ids[-1] == tok.eos_token_id and ids[-6:-1] == tok("the pizza was great .")["input_ids"]
    prompts = [" ".join(m["content"] for m in ex.messages) for ex in load_examples(["builtin:prompts:train:64"])]
    assert unknown_token_share(tok, prompts) == 0.0  # same words: it reads every prompt
    # A reward model that knows only a few of the words: PPO runs (scored on its own tokens, the value
    # model falls back to the policy) and says before training that it cannot read the prompts.
    few = word_level_rm(words[:4] + [w for w in words[4:] if w in ("the", "was", ".")] + ROLE_TOKENS,
                        tmp_path / "rm_few")
    assert unknown_token_share(few, prompts) > 0.5
    cfg = tiny_cfg(tmp_path, "train.max_steps=1",
                   data={"reward": {"sources": [{"name_or_path": str(tmp_path / "rm_few")}]}})
    assert train_ppo(cfg)["value_init"] == "policy"
    assert re.search(r"warning: reward model .*rm_few: \d+\.\d% of the tokens of the training prompts are its "
                     r"tokenizer's unknown token", capsys.readouterr().out)


# ----------------------------------------------------------------------------- reward model on the shared base


def make_reward_adapter(path, head_info, seed=0):
    """A LoRA reward adapter of builtin:tiny (random non-zero B and head), saved like `alignkit rm` saves one."""
    from alignkit.builtin import ensure_model
    from alignkit.config import ModelConfig
    from alignkit.modeling import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny")
    cfg.lora.enabled, cfg.lora.r = True, 4
    torch.manual_seed(seed)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, task="reward", num_labels=len(head_info["aspects"]), pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    with open(os.path.join(path, "alignkit_reward.json"), "w") as f:
        json.dump(head_info, f)
    assert os.path.realpath(ensure_model("builtin:tiny")) in os.path.realpath(
        json.load(open(os.path.join(path, "adapter_config.json")))["base_model_name_or_path"])
    return str(path)


HEAD2 = {"aspects": ["helpfulness", "harmlessness"], "weights": [1.0, 0.5], "offset": [0.3, -0.2], "scale": [2.0, 0.5]}


def test_reward_adapter_on_the_shared_base_scores_like_the_standalone_model(tmp_path):
    from alignkit.config import ModelConfig
    from alignkit.modeling import export_merged, load_model, resolve_path
    from alignkit.adapters import SharedBase

    path = make_reward_adapter(tmp_path / "rm_adapter", HEAD2)
    merged = export_merged(path, str(tmp_path / "rm_merged"), ModelConfig(name_or_path="builtin:tiny"), num_labels=2)
    with open(os.path.join(merged, "config.json")) as f:
        config = json.load(f)
    config["alignkit_reward"] = HEAD2
    with open(os.path.join(merged, "config.json"), "w") as f:
        json.dump(config, f)
    prompts = ["review the pizza", "describe the movie", "review the hotel"]
    responses = ["the pizza was great .", "the plot was bad .", "good"]
    ended = [True, True, False]

    reference = build_reward([RewardSourceConfig(name_or_path=merged)])(prompts, responses, ended)
    standalone = build_reward([RewardSourceConfig(name_or_path=path)])(prompts, responses, ended)
    cfg = ModelConfig(name_or_path="builtin:tiny")
    cfg.lora.enabled, cfg.lora.r = True, 4
    policy = load_model(cfg, task="causal-lm")
    shared = build_reward([RewardSourceConfig(name_or_path=path)],
                          shared_base=SharedBase(policy, resolve_path("builtin:tiny")))
    assert shared.models[0].shared and sorted(policy.peft_config) == ["default", "reward"]
    torch.testing.assert_close(standalone, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared(prompts, responses, ended), reference, atol=1e-5, rtol=1e-5)
    # Scoring switched adapters back: the policy's own adapter is active and trainable, the reward frozen.
    assert policy.active_adapter == "default"
    flags = {n: p.requires_grad for n, p in policy.named_parameters() if "lora_" in n}
    assert all(v for n, v in flags.items() if ".default." in n)
    assert not any(v for n, v in flags.items() if ".reward." in n)
    # A base other than the adapter's own is not shared (the adapter is loaded with its own base).
    other = build_reward([RewardSourceConfig(name_or_path=path)],
                         shared_base=SharedBase(policy, resolve_path("builtin:small")))
    assert not other.models[0].shared


def test_shared_base_ppo_reads_the_reward_adapter_without_loading_a_second_model(tmp_path, monkeypatch):
    import transformers
    from safetensors.torch import load_file

    path = make_reward_adapter(tmp_path / "rm_adapter", HEAD2, seed=1)

    def no_second_model(*a, **k):
        raise AssertionError("shared-base PPO loaded a separate sequence-classification model")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_second_model)
    cfg = tiny_cfg(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "ppo.shared_base=true",
                   "train.max_steps=1", "train.learning_rate=0.0",
                   data={"reward": {"sources": [{"name_or_path": path}]}})
    summary = train_ppo(cfg)
    assert summary["value_init"].startswith("copy of reward adapter")
    rm = load_file(os.path.join(path, "adapter_model.safetensors"))
    value = load_file(os.path.join(cfg.output_dir, "final_value", "adapter_model.safetensors"))
    head = load_file(os.path.join(cfg.output_dir, "final_value", "value_head.safetensors"))
    # lr 0: the value adapter is still the reward adapter's copy, and its head sum_k w_k / scale_k * W_k.
    lora_keys = [k for k in rm if "lora_" in k]
    assert lora_keys and sorted(lora_keys) == sorted(value)
    for k in lora_keys:
        torch.testing.assert_close(value[k], rm[k])
    w = rm["base_model.model.score.weight"]
    torch.testing.assert_close(head["weight"], 0.5 * w[0:1] + 1.0 * w[1:2])
    policy = load_file(os.path.join(cfg.output_dir, "final", "adapter_model.safetensors"))
    assert not any(".reward." in k or ".value." in k for k in policy)  # final/ is the policy's adapter only


def test_shared_base_value_from_a_separate_reward_model_is_refused(tmp_path):
    path = make_reward_model(tmp_path / "rm", 1)
    cfg = tiny_cfg(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "ppo.shared_base=true",
                   "ppo.value_init=reward", data={"reward": {"sources": [{"name_or_path": path}]}})
    with pytest.raises(ConfigError, match="ppo.value_init=reward with ppo.shared_base"):
        train_ppo(cfg)
    cfg = tiny_cfg(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "ppo.shared_base=true",
                   f"ppo.value_init={path}")
    with pytest.raises(ConfigError, match="not a separate folder"):
        train_ppo(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("config,extra", [("tiny.yaml", []), ("tiny_shared_base.yaml", []),
                                          ("tiny_shared_base.yaml", ["--model.load_in_4bit=true",
                                                                     "--train.mixed_precision=bf16"])])
def test_two_processes_with_accelerate_launch(tmp_path, config, extra):
    """Full fine-tuning (DDP) and shared-base LoRA (hand-averaged gradients) under `accelerate launch`:
    both processes end with the same weights, and the evaluation gathers both processes' answers."""
    from conftest import ACCELERATE, run_processes

    out = tmp_path / "two"
    run = run_processes([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no",
                         os.path.join(ROOT, "scripts/train_ppo.py"), "--config", os.path.join(ROOT, "configs/ppo", config),
                         "--model.name_or_path=builtin:tiny", "--data.train_files=[builtin:prompts:train:32]",
                         "--data.eval_files=[builtin:prompts:eval:13]", "--ppo.eval_samples=13",
                         "--ppo.rollout_batch_size=8", "--train.per_device_batch_size=8", "--ppo.response_length=8",
                         "--ppo.ppo_epochs=1", "--train.max_steps=2", "--train.save_every=0", "--train.eval_every=0",
                         "--log.progress=false", f"--output_dir={out}", *extra])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["num_processes"] == 2
    assert summary["replica_max_abs_difference"] == 0.0
    assert summary["last"]["loss/value"] > 0  # both losses trained: the value loss is never exactly 0 here
    # 13 held-out prompts shared 7 + 6 by the two processes, the answers of both gathered.
    assert summary["eval_before"]["eval/responses"] == 13 and summary["eval_after"]["eval/responses"] == 13
    assert summary["eval_before"]["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its reference


def test_value_model_starts_from_a_lora_reward_adapter_outside_shared_base(tmp_path):
    """Full fine-tuning with a LoRA reward model: it scores as an adapter and seeds the value as a merged copy."""
    from safetensors.torch import load_file

    path = make_reward_adapter(tmp_path / "rm_adapter", HEAD2, seed=2)
    cfg = tiny_cfg(tmp_path, "train.max_steps=1", "train.learning_rate=0.0",
                   data={"reward": {"sources": [{"name_or_path": path}]}})
    summary = train_ppo(cfg)
    assert summary["value_init"] == f"reward model {path}"
    w = load_file(os.path.join(path, "adapter_model.safetensors"))["base_model.model.score.weight"]
    v = load_file(os.path.join(cfg.output_dir, "final_value", "model.safetensors"))["score.weight"]
    torch.testing.assert_close(v, 0.5 * w[0:1] + 1.0 * w[1:2])  # sum_k w_k / scale_k * W_k


def test_bf16_reference_runs_under_the_policys_autocast(tmp_path):
    """Full fine-tuning under bf16: the separate reference copy gets the same autocast (and fp32 attention)
    as the policy, so before the first optimizer step the per-token KL is exactly 0."""
    cfg = tiny_cfg(tmp_path, "train.mixed_precision=bf16", "train.max_steps=1",
                   "data.eval_files=[builtin:prompts:eval:8]", "ppo.eval_samples=8")
    summary = train_ppo(cfg)
    assert summary["eval_before"]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    first = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))
             if "objective/kl" in line][0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)


def test_shared_base_value_gradients_are_the_same_with_gradient_checkpointing():
    """Checkpointed layers recompute in backward under the adapter active then; the value pass must not
    be checkpointed, or its adapter would get gradients computed from the policy adapter's activations."""
    from alignkit.config import ModelConfig
    from alignkit.modeling import load_model
    from alignkit.adapters import add_value_adapter

    def grads(checkpointing):
        cfg = ModelConfig(name_or_path="builtin:tiny", gradient_checkpointing=checkpointing)
        cfg.lora.enabled, cfg.lora.r = True, 4
        torch.manual_seed(0)
        policy = load_model(cfg, task="causal-lm")
        value = ValueModel(add_value_adapter(policy, cfg.lora, None, None))
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
            value.model.head.weight.normal_(0, 1.0)
        policy.train()
        value.train()
        ids = torch.randint(5, 50, (2, 12))
        mask, pos = torch.ones_like(ids), torch.arange(12)[None].expand(2, -1)
        v = value(ids, mask, pos)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        (v.pow(2).mean() + logits.float().logsumexp(-1).mean()).backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert any(".value." in n for n in plain) and any(".default." in n for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-4, rtol=1e-4)


def test_update_stops_early_once_the_policy_moved_past_max_update_kl(tmp_path):
    """ppo.max_update_kl (default 0.02): each update's first step always runs; with a threshold no step can
    stay under, every later step of the update is skipped. Off (null): ppo_epochs x num_minibatches steps."""
    def steps(name, *overrides):
        cfg = tiny_cfg(tmp_path / name, "train.max_steps=1", *overrides)
        train_ppo(cfg)
        rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
        return [r["policy/update_steps"] for r in rows if "policy/update_steps" in r]

    assert steps("off", "ppo.max_update_kl=null") == [4.0]  # 2 epochs x 2 minibatches
    assert steps("tight", "ppo.max_update_kl=1e-12") == [1.0]
    assert steps("loose", "ppo.max_update_kl=1e6") == [4.0]
    with pytest.raises(ConfigError, match="ppo.max_update_kl: must be > 0"):
        tiny_cfg(tmp_path, "ppo.max_update_kl=0")
