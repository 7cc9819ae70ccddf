"""alignkit: SFT -> reward model -> PPO (the InstructGPT recipe) on one human-feedback schema.

    import alignkit
    cfg = alignkit.load_config(alignkit.SFTConfig, "configs/sft/tiny.yaml")
    summary = alignkit.train_sft(cfg)

Imports are lazy so that ``import alignkit.losses`` needs only torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "alignkit.config",
    "ModelConfig": "alignkit.config",
    "DataConfig": "alignkit.config",
    "TrainConfig": "alignkit.config",
    "LogConfig": "alignkit.config",
    "Example": "alignkit.schema",
    "Label": "alignkit.schema",
    "load_examples": "alignkit.schema",
    "DataError": "alignkit.schema",
    "SFTConfig": "alignkit.sft",
    "train_sft": "alignkit.sft",
    "RMConfig": "alignkit.rm",
    "train_rm": "alignkit.rm",
    "PPOConfig": "alignkit.ppo",
    "train_ppo": "alignkit.ppo",
    "DPOConfig": "alignkit.dpo",
    "train_dpo": "alignkit.dpo",
    "KTOConfig": "alignkit.dpo",
    "train_kto": "alignkit.dpo",
    "ClassifierConfig": "alignkit.classifier",
    "train_classifier": "alignkit.classifier",
    "RewardSourceConfig": "alignkit.rewards",
    "build_reward": "alignkit.rewards",
    "load_reward_model": "alignkit.rewards",
    "PipelineConfig": "alignkit.pipeline",
    "run_pipeline": "alignkit.pipeline",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
