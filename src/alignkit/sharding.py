"""FSDP2 sharding: the one place that knows ``torch.distributed.fsdp.fully_shard``.

    accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/train_sft.py --config ...   # GPUs
    torchrun --nproc_per_node 2 scripts/train_sft.py --config ... --train.sharding=fsdp2              # CPU, gloo

Every decoder layer (the model's ``_no_split_modules``, or accelerate's
``fsdp_transformer_layer_cls_to_wrap``) becomes one FSDP unit and the whole model the
root unit, so each process keeps 1/N of every parameter, gradient and optimizer state
and all-gathers one layer at a time (Zhao et al. 2023, "PyTorch FSDP"). The same
:func:`shard_model` runs on GPUs (nccl) and on CPUs (gloo): accelerate only starts the
processes and shards the data; the model is never handed to ``accelerator.prepare``.

Also here: bf16 mixed precision as an FSDP policy (bf16 compute and all-gathers, fp32
master weights and gradient reduction), gradient clipping and no-sync accumulation on
sharded gradients, whole-model unsharding for generation, the full state gathered on
rank 0 for a normal ``save_pretrained`` folder, and distributed checkpoints
(``torch.distributed.checkpoint``) that record the number of processes that wrote them.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard, \
    register_fsdp_forward_method

from alignkit.config import ConfigError, TrainConfig

DCP_DIR = "sharded"  # inside checkpoint-<step>/: one DCP folder for every model and optimizer
META_FILE = "sharding.json"


@dataclass
class ShardingSettings:
    """What a run shards and how; from ``train.sharding`` and, under ``accelerate launch``, its FSDP config."""

    # Class names of the blocks that become one FSDP unit each (empty: the model's _no_split_modules).
    layer_classes: tuple[str, ...] = ()
    # Free a unit's gathered weights after its forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    # Keep the shards and optimizer state in CPU memory (GPU only).
    offload_params: bool = False
    # Where the settings came from, for error messages.
    source: str = "train.sharding"


def requested(train: TrainConfig) -> bool:
    """Whether this run shards: ``train.sharding: fsdp2`` or an accelerate FSDP config at launch."""
    return train.sharding == "fsdp2" or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def settings(train: TrainConfig) -> ShardingSettings:
    """Check the run's sharding options before any model loads; ConfigError names the key at fault."""
    if train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision: fp16 under sharding needs a sharded gradient scaler alignkit "
                          "does not have; use bf16")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return ShardingSettings()
    where = "accelerate config (fsdp_config)"
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"{where}: fsdp_version: alignkit shards with FSDP2; set fsdp_version: 2")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        # transformers would then load real weights on rank 0 only and leave the others on the meta device.
        raise ConfigError(f"{where}: fsdp_cpu_ram_efficient_loading: must be false (every process loads the "
                          "weights and keeps its shard)")
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return ShardingSettings(
        layer_classes=tuple(n.strip() for n in names.split(",") if n.strip()),
        reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "full_shard"),
        offload_params=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
        source=where,
    )


def init_process_group(device: torch.device) -> None:
    """A one-process group when nothing launched several (FSDP2 on one GPU or CPU still needs a group)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(tempfile.mktemp(prefix="alignkit-pg-"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    global _own_group
    _own_group = True


_own_group = False  # whether the process group is the one-process group made above


def destroy_own_group() -> bool:
    """Destroy the one-process group that ``init_process_group`` made (at the end of the stage that made
    it); a group a launcher made is left alone. Returns whether there was one."""
    global _own_group
    if not _own_group:
        return False
    _own_group = False
    dist.destroy_process_group()
    return True


def layer_classes(model: torch.nn.Module, opts: ShardingSettings) -> set[type]:
    """The module classes to shard one by one: named in the accelerate config, else the model's ``_no_split_modules``."""
    found = {type(m).__name__: type(m) for m in model.modules()}
    names = list(opts.layer_classes)
    if not names:
        for m in model.modules():
            names.extend(getattr(m, "_no_split_modules", None) or [])
    missing = [n for n in names if n not in found]
    if missing:
        key = "fsdp_transformer_layer_cls_to_wrap" if opts.layer_classes else "_no_split_modules"
        blocks = sorted({n for n, c in found.items() if n.endswith(("Layer", "Block"))})
        raise ConfigError(f"{opts.source}: {key}: {', '.join(missing)} is not a module of this model "
                          f"({type(model).__name__}); its blocks are {', '.join(blocks) or 'none'}")
    if not names:
        raise ConfigError(f"{opts.source}: {type(model).__name__} lists no decoder layer class (_no_split_modules): "
                          "set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    return {found[n] for n in names}


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16: layers compute and all-gather in bf16, the fp32 shards stay the master weights and gradients
    are reduced in fp32. ``no``: everything fp32."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, accelerator, opts: ShardingSettings,
                mixed_precision: str | None = None) -> torch.nn.Module:
    """Shard ``model`` in place over all processes: every decoder layer one FSDP unit, the model the root.

    Parameters become DTensors (dim 0 split over the processes); trainable and frozen weights
    (LoRA on a frozen base, a frozen reference model) shard alike. Every process must hold the
    same initial weights (all load the same folder with the same seed). Returns ``model``.
    """
    blocks = tuple(layer_classes(model, opts))
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ConfigError(f"{opts.source}: {meta[0]} is on the meta device (weights not loaded on this process)")
    init_process_group(accelerator.device)
    model.to(accelerator.device)
    mesh = dist.device_mesh.init_device_mesh(accelerator.device.type, (dist.get_world_size(),))
    kwargs = dict(mesh=mesh, reshard_after_forward=opts.reshard_after_forward,
                  mp_policy=mixed_precision_policy(mixed_precision or accelerator.mixed_precision))
    if opts.offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if isinstance(module, blocks) and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    backbone, heads = _backbone_and_heads(model)
    if backbone is not None:
        # Reward and value models call the backbone and the score head directly (modeling.head_outputs),
        # never the root's forward: each needs its own unit to gather its weights when called.
        for module in (backbone, *heads):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)  # the rest: embeddings, final norm and a tied output head when not split above
    if hasattr(model, "get_base_model"):
        # peft's generate calls the inner model's, never the root's forward: without this the first layer to run
        # would take itself for the root (FSDP2 lazy init) and the next training forward would fail.
        register_fsdp_forward_method(model, "generate")
    return model


def _backbone_and_heads(model: torch.nn.Module):
    """(backbone, [heads]) of a Hugging Face model (inside peft too), or (None, []) when a head shares
    the backbone's weights (tied input/output embeddings: they must stay in one unit, the root)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(hf, getattr(hf, "base_model_prefix", "") or "", None)
    if not isinstance(backbone, torch.nn.Module) or backbone is hf:
        return None, []
    inner = {id(p) for p in backbone.parameters()}
    heads = [c for c in hf.children() if c is not backbone and any(True for _ in c.parameters())]
    if any(id(p) in inner for h in heads for p in h.parameters()):
        return None, []
    return backbone, heads


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is, or wraps (e.g. a training-forward wrapper), an FSDP2-sharded module."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip sharded gradients to a global norm ``max_norm``; return the norm before clipping.

    Each process holds a slice of every gradient: the norm's square is summed over processes
    (``full_tensor``) before the common scale is applied to every slice.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, dist.tensor.DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return float(norm)


@contextmanager
def no_sync(model: torch.nn.Module):
    """Accumulate gradients locally (no reduce-scatter) for the micro-batches before the last one."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


@contextmanager
def unsharded(model: torch.nn.Module):
    """Hold every layer's full weights for the whole block (e.g. a rollout's ``generate``).

    Inside, forward passes run no collectives, so processes may generate different numbers of
    tokens (sampling, early EOS). Costs one full copy of the weights per process while it lasts
    (in the compute dtype); outside, each process keeps its 1/N shard again.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
        # Layers free their weights after forward again; the root (first unit) never does (FSDP2's default).
        for m in units:
            m.set_reshard_after_forward(m is not units[0], recurse=False)


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state on rank 0, in CPU memory; an empty dict on the other processes.

    Collective: every process must call it. Gathers one tensor at a time, so no process ever
    holds more than its shard plus one full tensor on the device.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=trainable_only))
    # A tied parameter (lm_head = input embeddings) comes back once per name as separate copies:
    # keep the first name, as an unsharded save_pretrained would.
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def save_pretrained(model: torch.nn.Module, tokenizer, out_dir: str, accelerator, model_cfg=None) -> None:
    """A normal Hugging Face folder from a sharded model (full weights, or the LoRA adapter), loadable on
    one process. Every process calls it; rank 0 writes."""
    from alignkit.modeling import save_model

    state = full_state_dict(model)
    if accelerator.is_main_process:
        save_model(model, tokenizer, out_dir, model_cfg, state_dict=state)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- distributed checkpoints


def save_checkpoint(path: str, models: dict, optimizers: dict) -> None:
    """Write every sharded model's trainable weights and its optimizer (same name) under ``path/sharded``.

    Collective; each process writes its own shards (``torch.distributed.checkpoint``). The
    frozen weights (a LoRA base, a reference model) are not written: they come from the model
    folder again on resume.
    """
    import torch.distributed.checkpoint as dcp

    state = _checkpoint_state(models, optimizers)
    dcp.save(state, checkpoint_id=os.path.join(path, DCP_DIR))
    if dist.get_rank() == 0:
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump({"engine": "fsdp2", "world_size": dist.get_world_size(), "models": sorted(models)}, f)


def _checkpoint_state(models: dict, optimizers: dict) -> dict:
    """The trainable sharded state of each model and its optimizer, as DCP saves and loads it."""
    state = {}
    for name, model in models.items():
        opt = optimizers.get(name)
        model_sd, optim_sd = get_state_dict(model, [opt] if opt is not None else [],
                                            options=StateDictOptions(ignore_frozen_params=True))
        state[name] = model_sd
        if opt is not None:
            state[f"{name}.optimizer"] = optim_sd
    return state


def load_checkpoint(path: str, models: dict, optimizers: dict) -> int:
    """Load what :func:`save_checkpoint` wrote into the sharded ``models`` and ``optimizers``; return the
    number of processes that wrote it. A different number of processes now is fine: DCP reshards."""
    import torch.distributed.checkpoint as dcp

    from alignkit.engine import TrainingError

    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise TrainingError(f"{path}: written without sharding (no {META_FILE}); resume it with train.sharding=none "
                            "and no accelerate FSDP config")
    with open(meta_path) as f:
        meta = json.load(f)
    if sorted(models) != meta["models"]:
        raise TrainingError(f"{path}: holds models {meta['models']}, this run has {sorted(models)}")
    state = _checkpoint_state(models, optimizers)
    dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR))
    for name, model in models.items():
        opt = optimizers.get(name)
        set_state_dict(model, [opt] if opt is not None else [], model_state_dict=state[name],
                       optim_state_dict=state.get(f"{name}.optimizer", {}),
                       options=StateDictOptions(ignore_frozen_params=True))
    return int(meta["world_size"])
