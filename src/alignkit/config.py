"""Typed configs: one dataclass per stage, built from shared groups, mirrored one to one by YAML.

Defaults live only in these dataclasses. YAML is read with ``yaml.safe_load`` and
merged into the dataclass schema by OmegaConf, which rejects unknown keys and
wrong types by name; command-line overrides are ``--section.key=value``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" targets every linear layer but the output head (peft's shortcut).
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # Also write output_dir/final_merged/: base + adapter merged, loadable without peft.
    merge_on_save: bool = False


# transformers' attention implementations; packing (a 4D mask per row) needs one of PACKING_ATTENTION.
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
PACKING_ATTENTION = ("sdpa", "eager")


@dataclass
class ModelConfig:
    # A Hub id, a local directory, or builtin:tiny / builtin:small (built offline on first use).
    name_or_path: str = "builtin:tiny"
    # Tokenizer location when it differs from the model's.
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    # Weights dtype: float32, bfloat16 or float16 (mixed precision is train.mixed_precision).
    dtype: str = "float32"
    # Run code shipped with a Hub model: only when you trust its author.
    trust_remote_code: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    # Recompute activations in backward: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("model.load_in_8bit and model.load_in_4bit: choose one")
        if self.attn_implementation not in ATTENTION and "/" not in self.attn_implementation:
            raise ConfigError(f"model.attn_implementation: must be one of {list(ATTENTION)} (or a Hub kernel "
                              f"'org/name'), got {self.attn_implementation!r}")


@dataclass
class DataConfig:
    # Files (.jsonl, .json, .parquet, save_to_disk folders), builtin:<kind>[:<split>[:<n>]] or hf:<name>[:<split>].
    train_files: List[str] = field(default_factory=lambda: ["builtin:sft"])
    eval_files: List[str] = field(default_factory=list)
    # Longest tokenized prompt + answer.
    max_length: int = 256
    # What to do with a longer example: error (stop before training, naming the row),
    # truncate (cut the answer's end, or the prompt's start if the prompt alone is too long), drop.
    truncation: str = "error"
    # Put several short examples in one row (they cannot attend to each other).
    packing: bool = True
    # Valid rows this stage cannot use (a prompt-only row in SFT data, a demonstration in reward-model
    # data) are always counted, listed and written to summary.json. auto: skip them unless they are more
    # than max_unusable_fraction of a split's rows, then stop before training; error: stop at any; skip: never stop.
    on_unusable: str = "auto"
    max_unusable_fraction: float = 0.01

    def __post_init__(self):
        if self.on_unusable not in ("auto", "error", "skip"):
            raise ConfigError(f"data.on_unusable: must be auto, error or skip, got {self.on_unusable!r}")
        if not 0.0 <= self.max_unusable_fraction <= 1.0:
            raise ConfigError(f"data.max_unusable_fraction: must be between 0 and 1, got {self.max_unusable_fraction}")
        if self.truncation not in ("error", "truncate", "drop"):
            raise ConfigError(f"data.truncation: must be error, truncate or drop, got {self.truncation!r}")
        if self.max_length < 8:
            raise ConfigError("data.max_length: must be at least 8")


@dataclass
class TrainConfig:
    seed: int = 0
    num_epochs: float = 1.0
    # If > 0, stop after this many optimizer steps (overrides num_epochs).
    max_steps: int = -1
    # Examples (or packed rows) per process per micro-batch.
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.03
    # linear, cosine, constant, constant_with_warmup (transformers' schedulers).
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    # no, bf16 or fp16: autocast; bf16 is about 2x faster than fp32 on recent CPUs too.
    mixed_precision: str = "no"
    # Evaluate every N optimizer steps (0: only at the end).
    eval_every: int = 0
    # Checkpoint every N optimizer steps (0: never); --resume continues from the last one.
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    # CPU threads for torch (0: torch's default). Tiny models train faster on 1 thread than on
    # several, which mostly wait on each other.
    num_threads: int = 0
    # none: every process holds the whole model (data parallel). fsdp2: every decoder layer and the
    # model are sharded over the processes with FSDP2 (alignkit.sharding); also switched on by an
    # accelerate FSDP config (configs/accelerate/fsdp.yaml).
    sharding: str = "none"

    def __post_init__(self):
        # YAML reads a bare `no` as false, which OmegaConf hands a str field as "False".
        if self.mixed_precision in ("False", "false", "fp32", "none"):
            self.mixed_precision = "no"
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision: must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train.per_device_batch_size and train.gradient_accumulation_steps must be >= 1")
        if self.sharding not in ("none", "fsdp2"):
            raise ConfigError(f"train.sharding: must be none or fsdp2, got {self.sharding!r}")


@dataclass
class LogConfig:
    # Trackers besides output_dir/metrics.jsonl (always written): wandb, tensorboard.
    trackers: List[str] = field(default_factory=list)
    project: str = "alignkit"
    run_name: Optional[str] = None
    # Show a progress bar on the main process.
    progress: bool = True

    def __post_init__(self):
        bad = [t for t in self.trackers if t not in ("wandb", "tensorboard", "jsonl")]
        if bad:
            raise ConfigError(f"log.trackers: unknown tracker(s) {bad}; choose from wandb, tensorboard")


def check_packing(model: ModelConfig, data: DataConfig) -> None:
    """Packed examples are isolated by a 4D mask, which only some attention implementations take."""
    if data.packing and model.attn_implementation not in PACKING_ATTENTION:
        raise ConfigError(f"data.packing: model.attn_implementation={model.attn_implementation} cannot isolate "
                          f"packed examples (it takes no 4D mask); use {' or '.join(PACKING_ATTENTION)}, "
                          "or set data.packing=false")


def _to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def to_dict(cfg) -> dict:
    return _to_plain(cfg)


def parse_overrides(args: list[str]) -> list[str]:
    """``--train.learning_rate=1e-4`` or ``--train.learning_rate 1e-4`` -> OmegaConf dotlist entries."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"unexpected argument {a!r}: overrides look like --section.key=value")
        a = a[2:]
        if "=" not in a:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{a} has no value: write --{a}=VALUE")
            a = f"{a}={args[i + 1]}"
            i += 1
        out.append(a)
        i += 1
    return out


def load_config(cls: Type[T], path: str | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> T:
    """Build ``cls`` from its defaults, then a YAML file (or dict), then dotlist overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = path or "<config>"
    raw: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if data:
        raw = {**raw, **data}
    try:
        schema = OmegaConf.structured(cls)
        from_file = merged = OmegaConf.merge(schema, OmegaConf.create(_lists_from_single(cls, raw)))
        if overrides:
            try:
                dotlist = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
                merged = OmegaConf.merge(merged, OmegaConf.create(_lists_from_single(cls, dotlist)))
            except OmegaConfBaseException as e:
                raise ConfigError(f"command line: {_omega_msg(e)}") from None
            except (TypeError, ValueError) as e:  # e.g. "key.0.field=..." into a list of sections
                raise ConfigError(f"command line: {' '.join(overrides)}: {e} (a list is set whole, e.g. "
                                  "--reward.sources='[{name_or_path: builtin:gold}]', not item by item)") from None
        try:
            return OmegaConf.to_object(merged)  # runs each section's checks (__post_init__)
        except ConfigError as e:
            if overrides and _builds(from_file):  # the file alone is fine: an override broke it
                raise ConfigError(f"command line: {e}") from None
            raise
    except ConfigError as e:
        if str(e).startswith("command line"):
            raise
        raise ConfigError(f"{where}: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_omega_msg(e)}") from None


def _builds(conf) -> bool:
    from omegaconf import OmegaConf

    try:
        OmegaConf.to_object(conf)
        return True
    except Exception:
        return False


def _lists_from_single(cls, raw):
    """``raw`` (YAML or override values for dataclass ``cls``) with a single value wrapped in a list wherever
    ``cls`` expects a list: ``train_files: a.jsonl`` or ``--reward.sources={name_or_path: rm}`` is a list of one."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return raw
    hints = typing.get_type_hints(cls)
    out = dict(raw)
    for key, value in raw.items():
        hint = hints.get(key)
        if hint is None or value is None:
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
            hint = args[0]
        if typing.get_origin(hint) in (list, List):
            item = (typing.get_args(hint) or [Any])[0]
            if _is_interpolation(value) or (isinstance(value, dict) and not dataclasses.is_dataclass(item)):
                continue  # OmegaConf resolves it, or names the wrong type
            if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                raise ConfigError(f"{key}.{next(iter(value))}: a list is set whole, not item by item")
            out[key] = [_lists_from_single(item, v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif dataclasses.is_dataclass(hint):
            out[key] = _lists_from_single(hint, value)
    return out


def _is_interpolation(value) -> bool:
    return isinstance(value, str) and value.startswith("${")


def _omega_msg(e) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    if "not in" in msg and key:
        return f"unknown key '{key}' ({msg})"
    return f"{key}: {msg}" if key else msg


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
