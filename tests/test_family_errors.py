"""The four silent errors real model families exposed, each on the built-in model made to behave like
one (pad = EOS, a generation_config.json with sampling defaults, eager attention, accumulation that
does not divide an epoch). tests/test_families.py runs the same invariants over eight families.

    python -m pytest tests/test_family_errors.py -q
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError, load_config
from alignkit.rewards import ModelReward, RewardSourceConfig, encode_for_reward
from alignkit.rollout import sample
from alignkit.sft import SFTConfig
from alignkit.tokenization import collate_sft, encode_pairs, sft_rows
from conftest import ROOT


def _copy_without_pad_token(src, dst):
    """builtin:tiny saved as a GPT-2 / Llama 3 style folder: a tokenizer with no pad token."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = None
    tok.save_pretrained(dst)
    assert AutoTokenizer.from_pretrained(dst).pad_token is None
    return str(dst)


def test_pad_equal_to_eos_ppo_reads_the_score_where_the_reward_model_was_trained(tiny_model_dir, tmp_path):
    """With pad = EOS, HF pools (and the RM trains) at the token before EOS; PPO's reward must read there too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _copy_without_pad_token(tiny_model_dir, tmp_path / "nopad")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    rm.config.pad_token_id = tok.eos_token_id
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = ModelReward(RewardSourceConfig(name_or_path=str(tmp_path / "rm")))
    prompts = ["review the pizza", "describe the song", "how was the hotel"]
    responses = ["the pizza was great .", "the song was dull but the sound was nice .", "the room was bad ."]
    ours = reward.raw_scores(prompts, responses)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = torch.cat([hf(input_ids=torch.tensor([encode_for_reward(tok, p, r)])).logits
                            for p, r in zip(prompts, responses)])
        # Not vacuous: the EOS position itself scores differently.
        at_eos = torch.stack([hf.score(hf.model(input_ids=torch.tensor([encode_for_reward(tok, p, r)]))
                                       .last_hidden_state[0, -1]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (at_eos - theirs).abs().max() > 1e-3


def test_sampling_ignores_the_models_generation_defaults(sft_model_dir, tmp_path):
    """A generation_config.json with repetition_penalty / top_k / no_repeat_ngram_size / suppress_tokens
    must not change PPO's samples: its log-probs are those of softmax(logits / T)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer
    from alignkit.rollout import left_pad
    from alignkit.tokenization import encode_prompt

    odd_dir = tmp_path / "odd"
    shutil.copytree(sft_model_dir, odd_dir)
    eos = AutoTokenizer.from_pretrained(sft_model_dir).eos_token_id
    with open(odd_dir / "generation_config.json", "w") as f:
        json.dump({"repetition_penalty": 2.0, "top_k": 3, "top_p": 0.5, "min_p": 0.2, "no_repeat_ngram_size": 2,
                   "suppress_tokens": [eos], "do_sample": True, "temperature": 0.3}, f)
    tok = load_tokenizer(ModelConfig(name_or_path=sft_model_dir), padding_side="left")
    prompts = ["review the pizza", "describe the car", "how was the show", "tell me about the phone"] * 2
    query, mask = left_pad([encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts],
                           tok.pad_token_id)
    out = []
    for folder in (sft_model_dir, odd_dir):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        torch.manual_seed(1)
        out.append(sample(model, query, mask, tok, response_length=24, temperature=1.0))
        if folder == odd_dir:
            assert model.generation_config.repetition_penalty == 2.0  # put back after sampling
    assert (out[0] == eos).any(-1).float().mean() > 0.5  # trained answers end; suppress_tokens would forbid it
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked_under_each_attention(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer
    from alignkit.schema import Example

    tok = load_tokenizer(ModelConfig(name_or_path=tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    exs = [(Example(prompt="review the pizza"), "the pizza was great ."),
           (Example(prompt="describe the car"), "the price was bad and the car was fun ."),
           (Example(prompt="how was the show"), "the show was okay .")]
    enc, _ = encode_pairs(tok, exs, 64, "error")
    rows = sft_rows(enc, 64, packing=True)
    assert len(rows) == 1 and len(rows[0]["seq_lens"]) == 3
    packed = collate_sft(rows, tok.pad_token_id, attn_implementation=attn)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"]).logits[0]
        start = 0
        for n in rows[0]["seq_lens"]:
            alone = model(input_ids=packed["input_ids"][:, start:start + n]).logits[0]
            torch.testing.assert_close(out[start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n


def test_packing_with_an_attention_that_cannot_isolate_examples_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.packing: model.attn_implementation=flash_attention_2"):
        load_config(SFTConfig, os.path.join(ROOT, "configs/sft/tiny.yaml"),
                    ["model.attn_implementation=flash_attention_2"])
    load_config(SFTConfig, os.path.join(ROOT, "configs/sft/tiny.yaml"),
                ["model.attn_implementation=flash_attention_2", "data.packing=false"])
    with pytest.raises(ConfigError, match="model.attn_implementation: must be one of"):
        load_config(SFTConfig, os.path.join(ROOT, "configs/sft/tiny.yaml"), ["model.attn_implementation=fast"])


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_resume_equals_uninterrupted_when_accumulation_does_not_divide_an_epoch(tmp_path, stage):
    """7 micro-batches per epoch, accumulation 3: step 3 takes micro-batches 6, 7 (epoch 0) and 1 (epoch 1)."""
    if stage == "sft":
        from alignkit.sft import SFTConfig as Cfg, train_sft as train
        common = ["data.train_files=[builtin:sft:train:28]", "data.packing=false"]
        weights = "model.safetensors"
    else:
        from alignkit.rm import RMConfig as Cfg, train_rm as train
        common = ["data.train_files=[builtin:pairs:train:28]", "rm.normalize_on=[builtin:sft:train:8]"]
        weights = "model.safetensors"
    common += ["train.per_device_batch_size=4", "train.gradient_accumulation_steps=3", "train.max_steps=6",
               "train.learning_rate=1e-3", "train.warmup_ratio=0", "train.lr_scheduler=constant",
               "train.mixed_precision=no", "train.save_every=3", "train.eval_every=0", "data.eval_files=[]",
               "log.progress=false", "train.num_threads=1"]
    path = os.path.join(ROOT, f"configs/{stage}/tiny.yaml")
    out = tmp_path / "run"
    train(load_config(Cfg, path, [f"output_dir={out}", *common]))
    reference = load_file(str(out / "final" / weights))
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-6", ignore_errors=True)
    summary = train(load_config(Cfg, path, [f"output_dir={out}", "train.resume=true", *common]))
    assert summary["steps"] == 6
    again = load_file(str(out / "final" / weights))
    half = load_file(str(out / "checkpoint-3" / weights))
    for k in reference:
        torch.testing.assert_close(again[k], reference[k], atol=1e-6, rtol=1e-5)
    assert any((half[k] - reference[k]).abs().max() > 1e-4 for k in reference)
