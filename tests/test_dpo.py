"""DPO and KTO stages: data checks with clear errors, reference log-probs, resume, and seeded gold-reward gains.

Run: pytest -q tests/test_dpo.py                 (fast tests, ~30 s)
     pytest -q tests/test_dpo.py -m slow         (the gold-reward gains, ~2 minutes)
"""

import os

import pytest
import torch

from alignkit.cli import main as cli_main
from alignkit.config import load_config
from alignkit.dpo import (
    DPOConfig,
    KTOConfig,
    collate,
    prepare_data,
    reference_logprobs,
    train_dpo,
    train_kto,
)
from alignkit.modeling import ModelLoadError, load_tokenizer
from alignkit.schema import DataError
from conftest import ROOT, write_jsonl


def small(cls, tmp_path, **sections):
    base = {"data": {"train_files": ["builtin:pairs:train:40"] if cls is DPOConfig else ["builtin:binary:train:40"],
                     "max_length": 64},
            "train": {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 1e-3, "log_every": 1,
                      "warmup_ratio": 0.0},
            "log": {"progress": False}, "output_dir": str(tmp_path / "run")}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(cls, data=base)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DPOConfig().model)


# ----------------------------------------------------------------------------- bad input


def test_dpo_without_pairs_names_what_it_found_and_needs(tmp_path, tokenizer):
    cfg = small(DPOConfig, tmp_path, data={"train_files": ["builtin:sft:train:5", "builtin:ratings:train:3"]})
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tokenizer)
    msg = str(e.value)
    assert "builtin:sft:train:5, builtin:ratings:train:3: labels: found 5 demonstration" in msg
    assert "rating" in msg and "dpo needs a preference pair" in msg


def test_dpo_bad_data_is_exit_code_2_without_traceback(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "review the pizza", "completion": "the pizza was good ."}])
    code = cli_main(["dpo", f"--data.train_files=[{path}]", f"--output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "dpo needs a preference pair" in err and "1 demonstration" in err and "Traceback" not in err


@pytest.mark.parametrize("good", [True, False])
def test_kto_with_one_class_only_is_an_error(tmp_path, tokenizer, good):
    rows = [{"prompt": "review the pizza", "completion": f"the pizza was {w} .", "label": good}
            for w in ("good", "great", "fun")]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    cfg = small(KTOConfig, tmp_path, data={"train_files": [path]})
    have, missing = ("desirable", "undesirable") if good else ("undesirable", "desirable")
    with pytest.raises(DataError, match=f"all 3 labelled answers of aspect 'overall' are {have} \\(no {missing}"):
        prepare_data(cfg, tokenizer)


def test_kto_without_binary_labels_or_pairs(tmp_path, tokenizer):
    cfg = small(KTOConfig, tmp_path, data={"train_files": ["builtin:sft:train:4"]})
    with pytest.raises(DataError, match="found 4 demonstration; kto needs a good/bad label or preference pair"):
        prepare_data(cfg, tokenizer)


def test_reference_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other_ref"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    cfg = small(DPOConfig, tmp_path, dpo={"reference": str(other)})
    with pytest.raises(ModelLoadError, match="dpo.reference .*other_ref: its tokenizer's vocabulary differs from the policy's"):
        train_dpo(cfg)
    assert not os.path.exists(tmp_path / "run" / "final")


def test_config_errors():
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="dpo.loss"):
        load_config(DPOConfig, None, ["dpo.loss=hinge"])
    with pytest.raises(ConfigError, match="sigmoid loss only"):
        load_config(DPOConfig, None, ["dpo.loss=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="per_device_batch_size"):
        load_config(KTOConfig, None, ["train.per_device_batch_size=1"])


# ----------------------------------------------------------------------------- data views


def test_rankings_give_every_pair_and_each_answer_once(tmp_path, tokenizer):
    cfg = small(DPOConfig, tmp_path, data={"train_files": ["builtin:rankings:train:6"]})
    elements, _, stats = prepare_data(cfg, tokenizer)
    assert all(len(el.sequences) == 4 and len(el.pairs) == 6 for el in elements)  # C(4, 2) pairs, 4 answers
    assert stats["train"]["pairs"] == 36


def test_kto_unpairs_comparisons(tmp_path, tokenizer):
    cfg = small(KTOConfig, tmp_path, data={"train_files": ["builtin:pairs:train:30"]})
    elements, _, stats = prepare_data(cfg, tokenizer)
    s = stats["train"]
    assert s["desirable"] == s["undesirable"] > 0 and s["unpaired_from_comparisons"] == len(elements)
    # The second sequence pairs the prompt with another row's answer (for z0).
    el = elements[0]
    assert el.sequences[0][:el.answer_starts[0]] == el.sequences[1][:el.answer_starts[1]]
    assert el.sequences[0] != el.sequences[1]


def test_kto_sft_term_is_the_desirable_answers_nll_per_token():
    from alignkit.dpo import KTOSettings, kto_terms

    # Sequences alternate (answer, mismatched answer): answer 0 desirable (log-prob -6 over 3 tokens),
    # answer 1 undesirable (-4 over 2 tokens). The SFT term adds sft_coef * 6 / 3 = 0.5 * 2.0 = 1.0 to the
    # loss sum, from the desirable answer only.
    logps = torch.tensor([-6.0, -5.0, -4.0, -7.0])
    batch = {"ref_logps": torch.tensor([-6.5, -5.0, -3.0, -7.5]), "answer_lengths": torch.tensor([3.0, 4.0, 2.0, 5.0])}
    desirable = torch.tensor([True, False])
    plain = kto_terms(logps, batch, desirable, KTOSettings(), (1.0, 1.0), None)
    with_sft = kto_terms(logps, batch, desirable, KTOSettings(sft_coef=0.5), (1.0, 1.0), None)
    assert (with_sft.loss_sum - plain.loss_sum).item() == pytest.approx(1.0)


def test_packed_and_padded_batches_give_the_same_logprobs(tmp_path, tokenizer, tiny_model_dir):
    from alignkit.modeling import load_model

    cfg = small(DPOConfig, tmp_path, data={"train_files": ["builtin:rankings:train:4"]})
    elements, _, _ = prepare_data(cfg, tokenizer)
    model = load_model(cfg.model)
    packed = reference_logprobs(model, elements, tokenizer.pad_token_id, 64, True, 4, "cpu")
    padded = reference_logprobs(model, elements, tokenizer.pad_token_id, 64, False, 4, "cpu")
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), atol=1e-4, rtol=0)
    # One sequence by hand: sum over answer tokens k of log softmax(logits[k - 1])[token k].
    seq, start = elements[0].sequences[1], elements[0].answer_starts[1]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
    by_hand = sum(logp[k - 1, seq[k]].item() for k in range(start, len(seq)))
    assert abs(packed[0][1] - by_hand) < 1e-4
    assert collate(elements, tokenizer.pad_token_id, 64, True)["input_ids"].numel() < \
        collate(elements, tokenizer.pad_token_id, 64, False)["input_ids"].numel()


def test_lora_reference_is_the_adapter_switched_off(tmp_path, tokenizer):
    from alignkit.modeling import load_model

    cfg = small(DPOConfig, tmp_path, model={"lora": {"enabled": True, "r": 4}})
    elements, _, _ = prepare_data(cfg, tokenizer)
    elements = elements[:4]
    policy = load_model(cfg.model)
    with torch.no_grad():  # move the adapter away from its zero start, so policy != base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    base = load_model(cfg.model.__class__(name_or_path=cfg.model.name_or_path))
    ref = reference_logprobs(policy, elements, tokenizer.pad_token_id, 64, True, 4, "cpu")
    base_logps = reference_logprobs(base, elements, tokenizer.pad_token_id, 64, True, 4, "cpu")
    torch.testing.assert_close(torch.tensor(ref), torch.tensor(base_logps), atol=1e-5, rtol=0)
    # ...while the policy itself (adapter on) scores differently, and its flags are untouched.
    from alignkit.dpo import SequenceLogprobs, _forward

    batch = collate(elements, tokenizer.pad_token_id, 64, True)
    with torch.no_grad():
        on = _forward(SequenceLogprobs(policy), batch)
    assert (on - torch.tensor([x for r in ref for x in r])).abs().max() > 1e-2
    assert any(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------- training


def test_dpo_resume_equals_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    full = small(DPOConfig, tmp_path / "a", train={"save_every": 2})
    summary = train_dpo(full)
    assert summary["steps"] == 4 and summary["train"]["rewards/accuracy"] is not None
    assert os.path.exists(tmp_path / "a" / "run" / "reference_logps.safetensors")
    # Interrupted after the checkpoint at step 2: a run folder holding only that checkpoint and the
    # reference log-probs resumes with steps 3 and 4.
    import shutil

    os.makedirs(tmp_path / "b" / "run")
    for name in ("checkpoint-2", "reference_logps.safetensors"):
        copy = shutil.copytree if name.startswith("checkpoint") else shutil.copy
        copy(tmp_path / "a" / "run" / name, tmp_path / "b" / "run" / name)
    resumed = small(DPOConfig, tmp_path / "b", train={"save_every": 2, "resume": True})
    assert train_dpo(resumed)["steps"] == 4
    a = load_file(str(tmp_path / "a" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_kto_and_ipo_train_and_write_summaries(tmp_path):
    import json

    s = train_kto(small(KTOConfig, tmp_path / "kto", data={"eval_files": ["builtin:binary:eval:16"]}))
    assert s["weights"]["desirable"] >= 1 and s["weights"]["undesirable"] >= 1
    assert s["eval_after"]["kl"] >= 0 and "rewards/desirable" in s["eval_after"]
    with open(tmp_path / "kto" / "run" / "summary.json") as f:
        assert json.load(f)["stage"] == "kto"
    s = train_dpo(small(DPOConfig, tmp_path / "ipo", dpo={"loss": "ipo"},
                        data={"eval_files": ["builtin:pairs:eval:16"]}))
    assert s["eval_before"]["rewards/margin"] == 0.0  # policy == reference before training
    assert s["eval_after"]["rewards/margin"] != 0.0


# ----------------------------------------------------------------------------- gold reward on the built-in task


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """A built-in SFT policy that writes grammatical answers most of the time (~30 s)."""
    from alignkit.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("sft_for_dpo")
    train_sft(load_config(SFTConfig, data={
        "data": {"train_files": ["builtin:sft:train:800"], "max_length": 64},
        "train": {"max_steps": 200, "per_device_batch_size": 16, "learning_rate": 3e-3, "warmup_ratio": 0.05,
                  "log_every": 50},
        "log": {"progress": False}, "output_dir": str(out)}))
    return str(out / "final")


def held_out_gold(policy_dir, sft_dir):
    """Gold reward of 128 held-out prompts sampled with one fixed seed, and KL to the SFT policy."""
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.modeling import load_model
    from alignkit.rollout import evaluate, load_prompts
    from alignkit.rewards import RewardSourceConfig, build_reward

    tok = load_tokenizer(ModelConfig(name_or_path=policy_dir), padding_side="left")
    prompts, _ = load_prompts(["builtin:prompts:eval"], tok, DataConfig(max_length=32), 0, limit=128)
    policy = load_model(ModelConfig(name_or_path=policy_dir), trainable=False)
    sft = load_model(ModelConfig(name_or_path=sft_dir), trainable=False)
    return evaluate(policy, sft, build_reward([RewardSourceConfig(name_or_path="builtin:gold")]), prompts, tok,
                    24, 1.0, 64, "cpu", True, seed=1234)


@pytest.mark.slow
def test_dpo_raises_held_out_gold_reward(tmp_path, sft_policy):
    # Measured: SFT -1.02 (std 1.59) -> DPO + RPO term -0.29, KL 0.4. Plain DPO (sft_coef 0) makes this tiny
    # model lose its grammar (malformed answers 22% -> 52%) while its well-formed answers get more positive.
    cfg = load_config(DPOConfig, data={
        "model": {"name_or_path": sft_policy},
        "data": {"train_files": ["builtin:pairs:train:2000"], "max_length": 64},
        "train": {"max_steps": 120, "per_device_batch_size": 16, "learning_rate": 3e-4, "warmup_ratio": 0.05,
                  "log_every": 40, "seed": 0},
        "dpo": {"beta": 0.1, "sft_coef": 1.0}, "log": {"progress": False}, "output_dir": str(tmp_path / "dpo")})
    summary = train_dpo(cfg)
    assert summary["train"]["rewards/accuracy"] > 0.6
    before, after = held_out_gold(sft_policy, sft_policy), held_out_gold(summary["final_dir"], sft_policy)
    gain = after["eval/gold_reward"] - before["eval/gold_reward"]
    assert gain > 0.3 * before["eval/gold_reward_std"], (before, after)


@pytest.mark.slow
def test_kto_with_an_sft_term_raises_held_out_gold_reward(tmp_path, sft_policy):
    # Measured: SFT -1.02 (std 1.59) -> KTO + SFT term -0.39 (+0.40 SFT std), KL 0.38. Plain KTO (sft_coef 0)
    # ends at -1.04 with KL 3.9: the undesirable answers are pushed down, the grammar with them.
    cfg = load_config(KTOConfig, data={
        "model": {"name_or_path": sft_policy},
        "data": {"train_files": ["builtin:binary:train:2000"], "max_length": 64},
        "train": {"max_steps": 120, "per_device_batch_size": 16, "learning_rate": 3e-4, "warmup_ratio": 0.05,
                  "log_every": 40, "seed": 0},
        "kto": {"beta": 0.1, "sft_coef": 1.0}, "log": {"progress": False}, "output_dir": str(tmp_path / "kto")})
    summary = train_kto(cfg)
    before, after = held_out_gold(sft_policy, sft_policy), held_out_gold(summary["final_dir"], sft_policy)
    gain = after["eval/gold_reward"] - before["eval/gold_reward"]
    assert gain > 0.25 * before["eval/gold_reward_std"], (before, after)
