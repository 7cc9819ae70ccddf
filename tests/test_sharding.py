"""FSDP2 sharding (alignkit.sharding) on CPU with two gloo processes: the sharded run computes what
one unsharded process computes, checkpoints reshard on resume, the final folder loads on one
process, PPO's pieces (generation, reference, reward, an update on a fixed rollout) match
their unsharded copies, and bad sharding options stop the run with a message naming the key."""

import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignkit import engine, sharding
from alignkit.config import ConfigError, TrainConfig, load_config
from alignkit.sft import SFTConfig, train_sft
from conftest import ROOT, on_cpu_if_fewer_gpus_than, run_processes

TINY = os.path.join(ROOT, "configs/sft/tiny.yaml")
LAUNCH = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
COMMON = ["--config", TINY, "--train.max_steps=6", "--train.log_every=1", "--train.mixed_precision=no",
          "--log.progress=false", "--data.eval_files=[builtin:sft:eval:32]", "--train.save_every=3"]


def run(cmd, env=None):
    """Every run here is compared with a two-process one: where fewer than 2 GPUs, all run on CPU."""
    return run_processes(cmd, env={**on_cpu_if_fewer_gpus_than(2), **(env or {})})


def losses(d):
    return [m["train/loss"] for m in map(json.loads, open(d / "metrics.jsonl")) if "train/loss" in m]


@pytest.mark.slow
def test_sharded_sft_matches_one_process_and_resumes_resharded(tmp_path):
    """Global batch 8 = 1 x 8 = 2 x 4. Two sharded processes give the one-process loss curve and final
    weights; their step-3 checkpoint (two shard files) resumed by ONE sharded process ends where the
    uninterrupted two-process run ended."""
    one = load_config(SFTConfig, TINY, [f"output_dir={tmp_path / 'one'}", "train.max_steps=6", "train.log_every=1",
                                        "train.mixed_precision=no", "log.progress=false", "train.save_every=0",
                                        "data.eval_files=[builtin:sft:eval:32]"])
    train_sft(one)
    # The shipped accelerate FSDP config, on CPU: two gloo processes, sharding switched on by the config alone.
    two = run([LAUNCH[0], "launch", "--config_file", os.path.join(ROOT, "configs/accelerate/fsdp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", os.path.join(ROOT, "scripts/train_sft.py"), *COMMON,
               "--train.per_device_batch_size=4", f"--output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.load(open(tmp_path / "two" / "summary.json"))["num_processes"] == 2
    assert "sharding: fsdp2" in (tmp_path / "two" / "config.yaml").read_text()
    assert len(losses(tmp_path / "one")) == 6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    ref = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    final = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert sorted(final) == sorted(ref)  # full weights, tied lm_head written once as unsharded
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], atol=2e-6, rtol=1e-5)

    ckpt = tmp_path / "two" / "checkpoint-3"
    assert sorted(os.listdir(ckpt / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.load(open(ckpt / "sharding.json"))["world_size"] == 2
    (tmp_path / "two" / "final").rename(tmp_path / "two" / "final_uninterrupted")
    resumed = run([sys.executable, "-m", "alignkit.cli", "sft", *COMMON, "--train.sharding=fsdp2",
                   "--train.resume=true", f"--output_dir={tmp_path / 'two'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 2 processes, resharded onto 1" in resumed.stdout + resumed.stderr
    again = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in final:
        torch.testing.assert_close(again[k], final[k], atol=2e-6, rtol=1e-5)
    assert losses(tmp_path / "two")[6:] == pytest.approx(losses(tmp_path / "one")[3:], rel=1e-5)


@pytest.mark.slow
def test_sharded_lora_bf16_saves_an_adapter_that_loads_on_one_process(tmp_path):
    two = run([*LAUNCH, os.path.join(ROOT, "scripts/train_sft.py"), "--config", os.path.join(ROOT,
              "configs/sft/tiny_lora.yaml"), "--train.max_steps=6", "--log.progress=false",
               "--data.eval_files=[builtin:sft:eval:32]", "--train.per_device_batch_size=4",
               "--train.mixed_precision=bf16", "--train.sharding=fsdp2", "--model.lora.merge_on_save=false",
               f"--output_dir={tmp_path}"])
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2, summary
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)  # the adapter only, gathered from the shards
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert any((p.abs().max() > 0) for n, p in model.named_parameters() if "lora_B" in n)  # trained, not the init


@pytest.mark.slow
def test_ppo_pieces_sharded_equal_their_unsharded_copies(tmp_path):
    """See tests/sharding_worker.py: generation, reference log-probs, reward scores and two PPO updates."""
    out = tmp_path / "worker.json"
    worker = run([*LAUNCH, os.path.join(ROOT, "tests/sharding_worker.py"), str(out)])
    assert worker.returncode == 0, worker.stderr[-3000:]
    r = json.load(open(out))
    assert r["world"] == 2 and r["sharded_dtensors"] and r["local_share"] == pytest.approx(0.5, abs=0.01)
    assert r["generate_equal"] and r["resharded_after_generate"]
    assert r["reference_max_diff"] < 1e-5 and r["reward_max_diff"] < 1e-5
    assert r["losses"] == pytest.approx(r["plain_losses"], rel=1e-4, abs=1e-5)
    assert [a for a, _ in r["grad_norms"]] == pytest.approx([b for _, b in r["grad_norms"]], rel=1e-4)
    # Policy and value weights after two AdamW steps: equal to the unsharded ones, and the steps were real.
    assert r["compared_tensors"] > 20 and r["update_size"] > 1e-2
    assert r["update_max_diff"] < 2e-4, r


def test_accelerate_fsdp_config_with_a_layer_class_the_model_lacks(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPT2Block")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Checked before any process group or device move: the accelerator is not even needed.
    with pytest.raises(ConfigError, match=r"accelerate config \(fsdp_config\): fsdp_transformer_layer_cls_to_wrap: "
                       r"GPT2Block is not a module of this model \(LlamaForCausalLM\); its blocks are LlamaDecoderLayer"):
        engine.shard(model, None, TrainConfig())


def test_sharding_options_checked_before_training(monkeypatch):
    with pytest.raises(ConfigError, match="train.sharding: must be none or fsdp2, got 'zero3'"):
        TrainConfig(sharding="zero3")
    with pytest.raises(ConfigError, match="train.mixed_precision: fp16 under sharding"):
        sharding.settings(TrainConfig(sharding="fsdp2", mixed_precision="fp16"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert sharding.requested(TrainConfig())  # an accelerate FSDP config switches sharding on by itself
    with pytest.raises(ConfigError, match="fsdp_version: alignkit shards with FSDP2; set fsdp_version: 2"):
        sharding.settings(TrainConfig())
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading: must be false"):
        sharding.settings(TrainConfig())


def test_a_sharded_checkpoint_resumed_without_sharding_names_the_fix(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / sharding.META_FILE).write_text(json.dumps({"engine": "fsdp2", "world_size": 2, "models": ["model"]}))
    with pytest.raises(engine.TrainingError, match="a sharded .FSDP2. checkpoint; resume it with train.sharding=fsdp2"):
        engine.load_checkpoint(None, str(ckpt), {"model": torch.nn.Linear(2, 2)}, {}, {})


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --cpu: its FSDP2 one-process row on a tiny Qwen2, printed as the table.
    (All nine rows on CPU: `bash benchmarks/gpu_check.sh --cpu`, a few minutes.)"""
    out = run(["bash", os.path.join(ROOT, "benchmarks/gpu_check.sh"), "--cpu", "--only", "3",
               "--workdir", str(tmp_path)], env={"PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model: Qwen2 architecture, random weights" in out.stdout
    assert re.search(r"SFT full, bf16, FSDP2 \(1 process\) \| ok +\| [\d,.]+ tokens/s \| [\d,]+ MB RSS", out.stdout)
    assert "sharding: fsdp2" in (tmp_path / "sft_fsdp2" / "config.yaml").read_text()


@pytest.mark.slow
def test_sharded_reward_model_matches_one_process(tmp_path):
    """RM training (packed pairs), global batch 16 = 1 x 16 = 2 x 8: same loss curve and final weights."""
    common = ["--config", os.path.join(ROOT, "configs/rm/tiny.yaml"), "--train.max_steps=4", "--train.log_every=1",
              "--train.mixed_precision=no", "--log.progress=false", "--data.eval_files=[]", "--train.save_every=0",
              "--rm.normalize_on=[builtin:sft:train:32]"]
    one = run([sys.executable, "-m", "alignkit.cli", "rm", *common, f"--output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([*LAUNCH, os.path.join(ROOT, "scripts/train_rm.py"), *common, "--train.per_device_batch_size=8",
               "--train.sharding=fsdp2", f"--output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(losses(tmp_path / "one")) == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    ref = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    final = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert sorted(final) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], atol=1e-5, rtol=1e-4)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "two" / "final"))
    assert model.config.alignkit_reward["aspects"] == ["overall"]


def test_shared_base_ppo_under_sharding_is_a_config_error_naming_the_key(monkeypatch):
    from alignkit.ppo import PPOConfig

    path = os.path.join(ROOT, "configs/ppo/tiny_shared_base.yaml")
    with pytest.raises(ConfigError, match="ppo.shared_base: not under FSDP2 sharding"):
        load_config(PPOConfig, path, ["train.sharding=fsdp2"])
    assert load_config(PPOConfig, path, ["train.sharding=fsdp2", "ppo.shared_base=false"]).train.sharding == "fsdp2"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an accelerate FSDP config alone
    with pytest.raises(ConfigError, match="its adapters switch on one base inside a step"):
        load_config(PPOConfig, path)


@pytest.mark.slow
def test_sharded_ppo_equals_ddp_and_saves_loadable_folders(tmp_path):
    """train_ppo on builtin:tiny with the gold reward, 2 updates of 2 x 8 responses (accumulation 2, a checkpoint
    after update 1): two FSDP2 processes (policy, value and reference sharded) log the same objective and end
    with the same policy and value as two DDP processes with the same seeds, i.e. the same rollouts. The
    final folders are ordinary Hugging Face models."""
    common = [os.path.join(ROOT, "scripts/train_ppo.py"), "--config", os.path.join(ROOT, "configs/ppo/tiny.yaml"),
              "--model.name_or_path=builtin:tiny", "--data.train_files=[builtin:prompts:train:32]",
              "--data.eval_files=[builtin:prompts:eval:13]", "--ppo.eval_samples=13", "--ppo.rollout_batch_size=8",
              "--train.per_device_batch_size=4", "--train.gradient_accumulation_steps=2", "--ppo.response_length=8",
              "--ppo.ppo_epochs=1", "--train.max_steps=2", "--train.save_every=1", "--train.eval_every=0",
              "--train.mixed_precision=no", "--log.progress=false"]
    ddp = run([*LAUNCH, *common, f"--output_dir={tmp_path / 'ddp'}"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    two = run([*LAUNCH, *common, "--train.sharding=fsdp2", f"--output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["num_processes"] == 2 and summary["replica_max_abs_difference"] is None  # one sharded copy
    # 13 held-out prompts, 7 + 6 per process with gathered weights; the policy is its (sharded) reference.
    assert summary["eval_before"]["eval/responses"] == 13
    assert summary["eval_before"]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    ckpt = tmp_path / "two" / "checkpoint-1"
    assert json.load(open(ckpt / "sharding.json"))["world_size"] == 2  # a distributed checkpoint

    def logged(d):
        return [{k: v for k, v in m.items() if k != "time" and not k.startswith("time/")}
                for m in map(json.loads, open(d / "metrics.jsonl"))]

    sharded_log, ddp_log = logged(tmp_path / "two"), logged(tmp_path / "ddp")
    assert [m["step"] for m in sharded_log] == [0, 1, 2, 2]  # eval before, 2 updates, eval after
    assert sharded_log[2]["objective/kl"] != 0 and sharded_log[2]["loss/value"] > 0  # the update moved the policy
    for mine, ref in zip(sharded_log, ddp_log):
        assert mine == pytest.approx(ref, rel=1e-5, abs=1e-6)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for folder, auto in (("final", AutoModelForCausalLM), ("final_value", AutoModelForSequenceClassification)):
        ref = load_file(str(tmp_path / "ddp" / folder / "model.safetensors"))
        final = load_file(str(tmp_path / "two" / folder / "model.safetensors"))
        assert sorted(final) == sorted(ref)
        for k in ref:
            torch.testing.assert_close(final[k], ref[k], atol=1e-5, rtol=1e-4)
        auto.from_pretrained(str(tmp_path / "two" / folder))
