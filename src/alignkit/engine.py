"""What every stage shares: accelerate set-up, optimizer and schedule, metrics, checkpoints.

Plain functions, no base class: each stage's loop calls them in the order it reads.
Checkpoints hold only safetensors and ``weights_only`` tensors plus JSON, so
resuming never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch

from alignkit import sharding
from alignkit.config import LogConfig, TrainConfig, to_dict


class TrainingError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_loopback_for_gloo() -> None:
    """Processes launched on one machine talk over loopback. Otherwise gloo binds the address the
    host name resolves to, and where that address is firewalled (containers, CI sandboxes, VPNs)
    the processes wait on each other until the 30-minute collective timeout instead of failing.
    Multi-machine runs and a GLOO_SOCKET_IFNAME the user set are left alone."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if not world or world != local or int(world) < 2:
        return
    import socket

    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback


def make_accelerator(train: TrainConfig, log: LogConfig, output_dir: str):
    """An Accelerator with the run's trackers; JSONL metrics are always written by MetricsLogger."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # Several stages may run in one process (the pipeline, a notebook): start each with a fresh
    # AcceleratorState so its mixed precision applies; the process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    if sharding.requested(train):
        sharding.settings(train)  # a bad sharding option stops the run here, before any model loads
        train.sharding = "fsdp2"  # also when an accelerate FSDP config asked: the saved config.yaml says so
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)
    trackers = [t for t in log.trackers if t != "jsonl"]
    if "wandb" in trackers and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # no key, no network: log locally, `wandb sync` later
    os.makedirs(output_dir, exist_ok=True)
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_DIR", output_dir)
    use_loopback_for_gloo()  # before accelerate creates the process group
    acc = Accelerator(
        # Without an accelerator, say cpu=True: otherwise `accelerate launch --multi_gpu` on a CPU
        # machine starts N independent single-process runs instead of one gloo group.
        cpu=not _has_accelerator(),
        mixed_precision=train.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")),
    )
    return acc


def end_training(accelerator) -> None:
    """End a stage: its trackers finish. A process group that a launcher made (several processes) stays up:
    the next stage in this process (a pipeline, the next member of a reward-model ensemble) needs it, and it
    is destroyed once, at exit, after the stages' models are gone. Destroying it here, as accelerate's
    ``end_training`` does, left the last reference to it with a DDP model's reducer, whose destructor joins
    gloo's threads while holding the GIL: a gloo thread that needs the GIL to free a tensor then deadlocks
    the process (seen: a finished two-process run that never exited). A one-process group that FSDP2 made
    for this stage (``sharding.init_process_group``) goes now, as before."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if not sharding.destroy_own_group() and not _exit_hook:
        import atexit

        atexit.register(_destroy_process_group_at_exit)
        _exit_hook.append(True)


_exit_hook: list = []  # holds True once the at-exit destruction is registered (once per process)


def _destroy_process_group_at_exit() -> None:
    import gc

    gc.collect()  # models in reference cycles go first, while the group is still registered
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(model, accelerator, train: TrainConfig, mixed_precision: str | None = None):
    """Shard ``model`` over the processes with FSDP2 when the run asks for it (``train.sharding: fsdp2`` or
    an accelerate FSDP config); otherwise return it as is. Call before building its optimizer."""
    if not sharding.requested(train):
        return model
    return sharding.shard_model(model, accelerator, sharding.settings(train), mixed_precision)


def prepare(accelerator, model, optimizer, *loaders):
    """``accelerator.prepare``: DDP for a whole model; a sharded model and its optimizer stay as they
    are (FSDP2 already reduces its gradients) and only the data loaders are split over processes."""
    if sharding.is_sharded(model):
        return (model, optimizer, *(accelerator.prepare(loader) for loader in loaders))
    return accelerator.prepare(model, optimizer, *loaders)


def no_sync(accelerator, model):
    """Accumulate this micro-batch's gradients without the cross-process reduction (DDP or FSDP2)."""
    return sharding.no_sync(model) if sharding.is_sharded(model) else accelerator.no_sync(model)


def gathered(model):
    """Full weights on every process for a block with an uneven number of forward passes per process
    (generation, evaluating each process's own slice); a no-op for an unsharded model."""
    return sharding.unsharded(model) if sharding.is_sharded(model) else nullcontext(model)


def full_state(model) -> dict | None:
    """A sharded model's whole state on rank 0 (collective: every process calls it); None when not sharded."""
    return sharding.full_state_dict(model) if sharding.is_sharded(model) else None


def save_final(accelerator, model, tokenizer, out_dir: str, model_cfg) -> None:
    """The final ``save_pretrained`` folder (full model or adapter, safetensors), loadable on one process."""
    from alignkit.modeling import save_model

    accelerator.wait_for_everyone()
    if sharding.is_sharded(model):
        sharding.save_pretrained(model, tokenizer, out_dir, accelerator, model_cfg)
    elif accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out_dir, model_cfg)
    accelerator.wait_for_everyone()


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def init_trackers(accelerator, log: LogConfig, config) -> None:
    if accelerator.log_with:
        kwargs = {"wandb": {"name": log.run_name}} if log.run_name else {}
        accelerator.init_trackers(log.project, config=_flat(to_dict(config)), init_kwargs=kwargs)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def use_fp32_attention_on_cpu(model, accelerator) -> bool:
    """Under bf16 autocast on CPU, compute attention in float32 (the linear layers stay bf16).

    torch's CPU flash-attention kernel is ~4x slower in bf16 than in fp32 (forward + backward
    with a packing mask, head_dim 16), while attention is a small share of the FLOPs: on
    builtin:tiny an SFT step drops from ~55 ms to ~30 ms. Same maths, rounded less. Only
    ``sdpa`` models are switched; nothing is stored in the saved config. Returns whether it switched.
    """
    if accelerator.device.type != "cpu" or accelerator.mixed_precision != "bf16":
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
        # autocast would cast sdpa's inputs back to bf16, so it is switched off around the call.
        with torch.autocast(query.device.type, enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                  **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register("sdpa_fp32", sdpa_fp32)
    # Same masks as sdpa; without this transformers would silently build none for 2D padding masks.
    AttentionMaskInterface.register("sdpa_fp32", sdpa_mask)
    model.set_attn_implementation("sdpa_fp32")
    return True


def fused_adamw_supported(named_params) -> bool:
    """Whether torch's fused AdamW (one kernel over all tensors) applies: every parameter a dense float
    tensor on cpu or cuda. Same update as the default; on CPU the default is a Python loop over the
    tensors (builtin:small: 3.4 ms -> 1.0 ms per step)."""
    ok = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    return all(p.dtype in ok and p.device.type in ("cpu", "cuda") and not p.is_sparse for _, p in named_params)


def make_optimizer(model, train: TrainConfig, num_training_steps: int, params=None):
    """AdamW (no weight decay on biases and norms; fused where supported) with warmup and a transformers schedule."""
    from transformers import get_scheduler

    named = [(n, p) for n, p in (params if params is not None else model.named_parameters()) if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.learning_rate,
                            betas=(train.adam_beta1, train.adam_beta2), fused=fused_adamw_supported(named) or None)
    warmup = math.ceil(train.warmup_ratio * num_training_steps)
    sched = get_scheduler(train.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=num_training_steps)
    return opt, sched


def plan_steps(num_items: int, accelerator, train: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for ``num_items`` rows shared by all processes."""
    micro_per_epoch = math.ceil(num_items / (train.per_device_batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, micro_per_epoch // train.gradient_accumulation_steps)
    total = train.max_steps if train.max_steps > 0 else math.ceil(train.num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def micro_batch_groups(accelerator, loader, step: int, accum: int):
    """Yield (epoch, [``accum`` micro-batches]) for each optimizer step from ``step`` on.

    The micro-batches form one stream over epochs (a seeded order per epoch, ``loader.set_epoch``),
    and an accumulation group may straddle an epoch's end when the epoch's micro-batches are not
    a multiple of ``accum``. A run resumed at ``step`` re-enters the stream at micro-batch
    ``step * accum``, so it trains on exactly the batches of the uninterrupted run.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise TrainingError("the training data gives no micro-batch on this process")
    epoch, skip = divmod(step * accum, per_epoch)

    def stream(epoch, skip):
        while True:
            loader.set_epoch(epoch)
            for mb in accelerator.skip_first_batches(loader, skip) if skip else loader:
                yield epoch, mb
            epoch, skip = epoch + 1, 0

    micro = stream(epoch, skip)
    while True:
        group = [next(micro) for _ in range(accum)]
        yield group[-1][0], [mb for _, mb in group]


def start_run(accelerator, cfg, models: dict, optimizers: dict, schedulers: dict) -> tuple[int, dict, "MetricsLogger"]:
    """Resume from the last checkpoint when ``cfg.train.resume``; save the config; open trackers and
    metrics.jsonl. Returns (step, checkpoint state, logger)."""
    from alignkit.config import save_config

    step, state = 0, {}
    if cfg.train.resume:
        ckpt = latest_checkpoint(cfg.output_dir)
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint in {cfg.output_dir}, starting from scratch")
        else:
            state = load_checkpoint(accelerator, ckpt, models, optimizers, schedulers)
            step = state["step"]
            accelerator.print(f"resumed from {ckpt} at step {step}")
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    init_trackers(accelerator, cfg.log, cfg)
    return step, state, MetricsLogger(accelerator, cfg.output_dir, resume=step > 0)


def optimizer_step(accelerator, params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the (already accumulated) gradients, step optimizer and schedule, clear; return the grad norm."""
    params = list(params)
    if any(isinstance(p, torch.distributed.tensor.DTensor) for p in params):
        grad_norm = sharding.clip_grad_norm(params, max_grad_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def broadcast_parameters(params, accelerator) -> None:
    """Give every process rank 0's values of ``params`` (what DDP does when it wraps a model)."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def average_gradients(params, accelerator) -> None:
    """Average the gradients of ``params`` over processes in one all-reduce (for modules DDP cannot wrap).

    A parameter without a gradient on this process counts as a zero gradient, so every
    process sends the same flat buffer.
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def replica_difference(params, accelerator) -> float:
    """Largest absolute difference between this process's ``params`` and rank 0's (0.0 when in sync)."""
    if accelerator.num_processes == 1:
        return 0.0
    import torch.distributed as dist

    with torch.no_grad():
        mine = torch.cat([p.detach().reshape(-1).float() for p in params])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = (mine - ref).abs().max() if mine.numel() else torch.zeros(())
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


class MetricsLogger:
    """Appends one JSON object per log call to ``output_dir/metrics.jsonl`` and forwards to trackers."""

    def __init__(self, accelerator, output_dir: str, resume: bool = False):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.start = time.time()
        if accelerator.is_main_process and not resume and os.path.exists(self.path):
            os.remove(self.path)

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "time": round(time.time() - self.start, 3), **metrics}) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log(metrics, step=step)


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(accelerator, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not (enabled and accelerator.is_local_main_process))


def check_finite(value: torch.Tensor, what: str, step: int, output_dir: str) -> None:
    if not torch.isfinite(value).all():
        last = latest_checkpoint(output_dir)
        kept = f"; the last good checkpoint is kept at {last}" if last else ""
        raise TrainingError(f"non-finite {what} at step {step} ({value.detach().float().flatten()[:4].tolist()}): "
                            f"stopping{kept}. Lower the learning rate or check the data.")


# ----------------------------------------------------------------------------- checkpoints

CKPT_PREFIX = "checkpoint-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only the trained tensors: the full model, or a LoRA adapter and its heads."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, output_dir: str, step: int, models: dict, optimizers: dict, schedulers: dict,
                    state: dict, keep: int = 2) -> str | None:
    """Write ``output_dir/checkpoint-<step>/``: trainable weights as safetensors, optimizer and
    scheduler states as plain tensors, and ``state.json``; keep the newest ``keep``.

    Sharded models and their optimizers go to a distributed checkpoint instead (every process
    writes its shards, :func:`alignkit.sharding.save_checkpoint`)."""
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    path = os.path.join(output_dir, f"{CKPT_PREFIX}{step}")
    tmp = path + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    sharded = {n: m for n, m in models.items() if sharding.is_sharded(m)}
    if sharded:
        sharding.save_checkpoint(tmp, sharded, {n: o for n, o in optimizers.items() if n in sharded})
    torch.save(rng_state(), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, model in models.items():
            if name not in sharded:
                save_file(trainable_state(accelerator.unwrap_model(model)), os.path.join(tmp, f"{name}.safetensors"))
        for name, opt in optimizers.items():
            if name not in sharded:
                torch.save(opt.state_dict(), os.path.join(tmp, f"{name}.optimizer.pt"))
        for name, sched in schedulers.items():
            with open(os.path.join(tmp, f"{name}.scheduler.json"), "w") as f:
                json.dump(sched.state_dict(), f, default=_json_default)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint under the real name
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if callable(o):
        return None  # lr_lambdas are rebuilt by the scheduler's constructor
    raise TypeError(type(o))


def list_checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for d in os.listdir(output_dir):
        if d.startswith(CKPT_PREFIX) and not d.endswith(".tmp") and d[len(CKPT_PREFIX):].isdigit():
            steps.append(int(d[len(CKPT_PREFIX):]))
    return [os.path.join(output_dir, f"{CKPT_PREFIX}{s}") for s in sorted(steps)]


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(accelerator, path: str, models: dict, optimizers: dict, schedulers: dict) -> dict:
    from safetensors.torch import load_file

    sharded = {n: m for n, m in models.items() if sharding.is_sharded(m)}
    if sharded:
        written_by = sharding.load_checkpoint(path, sharded, {n: o for n, o in optimizers.items() if n in sharded})
        if written_by != accelerator.num_processes:
            accelerator.print(f"{path}: written by {written_by} processes, resharded onto {accelerator.num_processes}")
    elif os.path.exists(os.path.join(path, sharding.META_FILE)):
        raise TrainingError(f"{path}: a sharded (FSDP2) checkpoint; resume it with train.sharding=fsdp2")
    for name, model in models.items():
        if name in sharded:
            continue
        tensors = load_file(os.path.join(path, f"{name}.safetensors"))
        target = accelerator.unwrap_model(model)
        params = dict(target.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise TrainingError(f"{path}: checkpoint tensors {missing[:3]} do not match the model")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].dtype))
    for name, opt in optimizers.items():
        if name in sharded:
            continue
        opt.load_state_dict(torch.load(os.path.join(path, f"{name}.optimizer.pt"), weights_only=True,
                                       map_location="cpu"))
    for name, sched in schedulers.items():
        with open(os.path.join(path, f"{name}.scheduler.json")) as f:
            sd = json.load(f)
        sd.pop("lr_lambdas", None)
        sched.load_state_dict({**sched.state_dict(), **sd})
    rng = os.path.join(path, f"rng-{accelerator.process_index}.pt")
    if os.path.exists(rng):  # a run resumed on as many processes draws the same dropout masks
        set_rng_state(torch.load(rng, weights_only=True))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def rng_state() -> dict:
    """This process's random number generators (torch, CUDA, Python, NumPy), as plain tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
