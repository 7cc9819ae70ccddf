"""Configs: dataclass defaults, YAML mirrors them, unknown keys are errors, every shipped YAML loads."""

import glob
import importlib
import os

import pytest
import yaml

from alignkit.config import ConfigError, load_config, parse_overrides
from alignkit.sft import SFTConfig
from conftest import ROOT

STAGE_CLASSES = {"sft": ("alignkit.sft", "SFTConfig"), "rm": ("alignkit.rm", "RMConfig"),
                 "ppo": ("alignkit.ppo", "PPOConfig"), "pipeline": ("alignkit.pipeline", "PipelineConfig"),
                 "dpo": ("alignkit.dpo", "DPOConfig"), "kto": ("alignkit.dpo", "KTOConfig"),
                 "classifier": ("alignkit.classifier", "ClassifierConfig")}


def shipped_stage_configs():
    out = []
    for stage in STAGE_CLASSES:
        out += [(stage, p) for p in sorted(glob.glob(os.path.join(ROOT, "configs", stage, "*.yaml")))]
    return out


@pytest.mark.parametrize("stage,path", shipped_stage_configs(), ids=lambda x: os.path.basename(str(x)))
def test_every_shipped_stage_yaml_loads(stage, path):
    mod, cls = STAGE_CLASSES[stage]
    cfg = load_config(getattr(importlib.import_module(mod), cls), path)
    assert cfg.output_dir


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml"))),
                         ids=os.path.basename)
def test_accelerate_configs_parse(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")
    assert cfg["num_processes"] >= 1


def test_every_config_dir_has_a_stage():
    for d in os.listdir(os.path.join(ROOT, "configs")):
        assert d in STAGE_CLASSES or d == "accelerate", d


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.learning_rat'"):
        load_config(SFTConfig, str(p))


def test_wrong_type_and_bad_enum_are_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  per_device_batch_size: many\n")
    with pytest.raises(ConfigError, match="per_device_batch_size"):
        load_config(SFTConfig, str(p))
    p.write_text("data:\n  truncation: chop\n")
    with pytest.raises(ConfigError, match="data.truncation"):
        load_config(SFTConfig, str(p))


def test_overrides_and_defaults_live_in_the_dataclass(tmp_path):
    cfg = load_config(SFTConfig, os.path.join(ROOT, "configs/sft/tiny.yaml"),
                      parse_overrides(["--train.learning_rate=0.5", "--model.lora.enabled", "true",
                                       "--data.train_files=[a.jsonl,b.jsonl]"]))
    assert cfg.train.learning_rate == 0.5 and cfg.model.lora.enabled is True
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert load_config(SFTConfig).train.max_grad_norm == SFTConfig().train.max_grad_norm
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(SFTConfig, None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.learning_rate"])
    from alignkit.ppo import PPOConfig

    with pytest.raises(ConfigError, match="a list is set whole"):  # not a raw OmegaConf TypeError
        load_config(PPOConfig, os.path.join(ROOT, "configs/ppo/tiny.yaml"), ["reward.sources.0.name_or_path=x"])
    # YAML reads a bare `no` as false; the field still means "no mixed precision".
    assert load_config(SFTConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, "/nonexistent/c.yaml")


@pytest.mark.parametrize("target", ["0", "-1.5"])
def test_kl_target_not_positive_is_a_config_error(target):
    from alignkit.ppo import PPOConfig

    with pytest.raises(ConfigError, match="ppo.kl_target: must be > 0"):
        load_config(PPOConfig, os.path.join(ROOT, "configs/ppo/tiny.yaml"), [f"ppo.kl_target={target}"])


def test_a_check_broken_by_the_command_line_blames_the_command_line_not_the_file(tmp_path):
    """A section's own check (__post_init__) that fails only because of an override names the command
    line; the same bad value in the YAML names the file."""
    from alignkit.ppo import PPOConfig

    tiny = os.path.join(ROOT, "configs/ppo/tiny.yaml")
    with pytest.raises(ConfigError, match=r"^command line: ppo.max_update_kl: must be > 0"):
        load_config(PPOConfig, tiny, ["ppo.max_update_kl=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  max_update_kl: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: ppo.max_update_kl: must be > 0"):
        load_config(PPOConfig, str(bad), ["train.max_steps=1"])
