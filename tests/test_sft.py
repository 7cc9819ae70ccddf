"""The SFT stage end to end on the built-in default: it learns, resumes exactly, runs with
LoRA / 8-bit / 4-bit, loads real model folders, logs, and runs as two processes."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.modeling import ModelLoadError
from alignkit.sft import SFTConfig, train_sft
from conftest import ACCELERATE, ROOT, on_cpu_if_fewer_gpus_than, run_processes

TINY = os.path.join(ROOT, "configs/sft/tiny.yaml")


def cfg_for(out, *overrides):
    return load_config(SFTConfig, TINY, [f"output_dir={out}", "log.progress=false", "train.save_every=0",
                                         "train.eval_every=0", "data.eval_files=[builtin:sft:eval:64]", *overrides])


def test_sft_lowers_held_out_loss_and_writes_outputs(sft_model_dir):
    out = os.path.dirname(sft_model_dir)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 1.0, summary
    assert summary["rows"]["train"] == {"read": 2000, "used": 2000, "left_out": 0, "reasons": {}}
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any("train/loss" in m for m in metrics) and any("eval/loss" in m for m in metrics)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft_model_dir)
    tok = AutoTokenizer.from_pretrained(sft_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "review the pizza"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.split()[:1] == ["the"], text  # it has learned the answer format


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = cfg_for(tmp_path / "a", "train.max_steps=12", "train.mixed_precision=no", "train.save_every=6")
    train_sft(full)
    reference = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    # Interrupted run: same config, but keep only the step-6 checkpoint and resume from it.
    resumed = cfg_for(tmp_path / "a", "train.max_steps=12", "train.mixed_precision=no", "train.save_every=6",
                      "train.resume=true")
    assert os.path.isdir(tmp_path / "a" / "checkpoint-6")
    os.rename(tmp_path / "a" / "final", tmp_path / "a" / "final_uninterrupted")
    summary = train_sft(resumed)
    assert summary["steps"] == 12
    again = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    for k in reference:
        torch.testing.assert_close(again[k], reference[k], atol=1e-6, rtol=1e-5)
    # The check is not vacuous: the step-6 weights differ from the final ones.
    half = load_file(str(tmp_path / "a" / "checkpoint-6" / "model.safetensors"))
    assert any((half[k] - reference[k]).abs().max() > 1e-4 for k in reference)


@pytest.mark.parametrize("quant", ["none", "8bit", "4bit"])
def test_lora_and_quantized_lora_train_and_save_adapters(tmp_path, quant):
    flags = {"none": [], "8bit": ["model.load_in_8bit=true"], "4bit": ["model.load_in_4bit=true"]}[quant]
    cfg = cfg_for(tmp_path, "train.max_steps=15", "model.lora.enabled=true", "train.learning_rate=0.01",
                  "model.lora.merge_on_save=true", *flags)
    summary = train_sft(cfg)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final_merged"))
    assert merged.config.model_type == "llama"


def test_merging_a_lora_on_a_tied_lm_head_keeps_the_input_embeddings(tmp_path, tiny_model_dir):
    """builtin:tiny ties lm_head to the input embeddings: the merged model must compute what the adapter did."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.config import ModelConfig
    from alignkit.modeling import export_merged

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert base.get_input_embeddings().weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    embeddings = base.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    out = export_merged(str(tmp_path / "adapter"), str(tmp_path / "merged"), ModelConfig(name_or_path=tiny_model_dir))
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(merged.get_input_embeddings().weight, embeddings)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_model_loaded_from_a_saved_folder_and_bad_paths(tmp_path, tiny_model_dir):
    import shutil

    local = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, local)
    summary = train_sft(cfg_for(tmp_path / "run", f"model.name_or_path={local}", "train.max_steps=3"))
    assert summary["steps"] == 3
    with pytest.raises(ModelLoadError, match="model path not found: ./no/such/model"):
        train_sft(cfg_for(tmp_path / "run2", "model.name_or_path=./no/such/model", "train.max_steps=1"))


def test_trackers_wandb_offline_and_tensorboard(tmp_path):
    pytest.importorskip("wandb")  # in the test extras; a bare GPU image may lack it
    summary = train_sft(cfg_for(tmp_path, "train.max_steps=2", "train.log_every=1", "log.trackers=[wandb,tensorboard]"))
    assert summary["steps"] == 2
    assert (tmp_path / "wandb").is_dir()
    assert any("events.out.tfevents" in f for _, _, fs in os.walk(tmp_path / "logs") for f in fs)


@pytest.mark.slow
def test_cli_and_accelerate_script_two_processes_match_one(tmp_path):
    """Same global batch (8 = 1 x 8 = 2 x 4): the two-process loss curve equals the one-process one."""
    common = ["--config", TINY, "--train.max_steps=6", "--train.log_every=1", "--train.mixed_precision=no",
              "--log.progress=false", "--data.eval_files=[builtin:sft:eval:32]"]
    one = run_processes([sys.executable, "-m", "alignkit.cli", "sft", *common, f"--output_dir={tmp_path / 'one'}"],
                        env=on_cpu_if_fewer_gpus_than(2))  # where the two-process run will be
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_processes([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no",
                         os.path.join(ROOT, "scripts/train_sft.py"), *common, "--train.per_device_batch_size=4",
                         f"--output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-2000:]
    s2 = json.load(open(tmp_path / "two" / "summary.json"))
    assert s2["num_processes"] == 2

    def losses(d):
        return [m["train/loss"] for m in map(json.loads, open(d / "metrics.jsonl")) if "train/loss" in m]

    assert len(losses(tmp_path / "one")) == 6
    for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert a == pytest.approx(b, rel=1e-4)
    s1 = json.load(open(tmp_path / "one" / "summary.json"))
    assert s1["eval_loss_after"] == pytest.approx(s2["eval_loss_after"], rel=1e-4)
