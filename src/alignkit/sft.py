"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

    alignkit sft --config configs/sft/tiny.yaml
    accelerate launch scripts/train_sft.py --config configs/sft/tiny.yaml

Reads top to bottom: accelerator -> tokenizer -> data (validated before the model
loads) -> model -> fit. The loss is the mean cross-entropy over every answer token
of the global batch (all micro-batches, all processes), so gradient accumulation
and the number of processes do not change what is optimised.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignkit import engine
from alignkit.config import DataConfig, LogConfig, ModelConfig, TrainConfig, check_packing
from alignkit.modeling import check_packing_window, count_parameters, load_model, load_tokenizer
from alignkit.schema import DataError, demonstrations, load_examples, prepare_splits
from alignkit.tokenization import IGNORE_INDEX, collate_sft, encode_pairs, sft_rows


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/sft"

    def __post_init__(self):
        check_packing(self.model, self.data)


def sft_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over answer tokens and their count.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on prompt and padding.
    Position t predicts token t+1, so labels are shifted left by one.
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()
    shift_labels = labels[:, 1:].flatten()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(rows, batch_size, collate, seed, shuffle=True):
    """Batches in a seeded order per epoch. The loader draws its iterators' seeds from its own generator,
    not the global one, so a resumed run's dropout masks (global RNG, restored from the checkpoint) match."""
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, sampler=EpochSampler(len(rows), seed, shuffle),
                                       collate_fn=collate, generator=torch.Generator().manual_seed(seed))


def prepare_sft_data(cfg: SFTConfig, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """Load, validate and tokenize train and eval data; every problem is reported before training.
    ``stats["rows"]`` accounts for every row read: used, or left out and why."""
    def build(examples, split, files):
        pairs = demonstrations(examples)
        if not pairs:
            raise DataError([f"{', '.join(files)}: labels: no demonstrations found "
                             "(SFT needs {prompt, completion}, {messages} or demonstration labels)"])
        encoded, dropped = encode_pairs(tokenizer, pairs, cfg.data.max_length, cfg.data.truncation)
        rows = sft_rows(encoded, cfg.data.max_length, cfg.data.packing)
        return rows, {"examples": len(encoded), "dropped": dropped, "rows": len(rows),
                      "answer_tokens": sum(len(e.answer_ids) for e in encoded)}

    return prepare_splits(cfg.data, cfg.train.seed, "sft", build)


def demonstration_rows(files: list[str], tokenizer, max_length: int, truncation: str, seed: int,
                       what: str = "SFT") -> list[dict]:
    """Demonstrations of ``files`` prepared exactly as SFT prepares them, one example per row (PPO-ptx)."""
    pairs = demonstrations(load_examples(files, seed=seed))
    if not pairs:
        raise DataError([f"{', '.join(files)}: labels: no demonstrations found for {what}"])
    encoded, _ = encode_pairs(tokenizer, pairs, max_length, truncation)
    return sft_rows(encoded, max_length, packing=False)


def demonstration_batches(rows, batch_size: int, pad_token_id: int, seed: int):
    """An endless, seeded stream of padded SFT batches (PPO-ptx mixes them into PPO's steps)."""
    loader = make_loader(rows, batch_size, lambda rs: collate_sft(rs, pad_token_id), seed)
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def mean_token_loss(model, batch: dict, device) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of one ``collate_sft`` batch."""
    batch = {k: v.to(device) for k, v in batch.items() if k != "num_tokens"}
    labels = batch.pop("labels")
    loss_sum, n = sft_token_loss(model(**batch, use_cache=False).logits, labels)
    return loss_sum / n.clamp(min=1)


@torch.no_grad()
def evaluate(model, loader, accelerator) -> float:
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with engine.gathered(model):  # processes may hold different numbers of eval batches
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            batch.pop("num_tokens")
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss_sum, n = sft_token_loss(logits, labels)
            total += loss_sum
            count += n
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


def train_sft(cfg: SFTConfig) -> dict:
    accelerator = engine.make_accelerator(cfg.train, cfg.log, cfg.output_dir)
    engine.seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, data_stats = prepare_sft_data(cfg, tokenizer)
    row_accounts = data_stats.pop("rows")

    model = load_model(cfg.model, task="causal-lm")
    check_packing_window(model, cfg.data)
    model.config.use_cache = False  # no KV cache while training
    engine.use_fp32_attention_on_cpu(model, accelerator)
    trainable, total = count_parameters(model)
    model = engine.shard(model, accelerator, cfg.train)  # FSDP2 when train.sharding=fsdp2: optimizer on the shards

    attn = model.config._attn_implementation

    def collate(rows):
        return collate_sft(rows, tokenizer.pad_token_id, attn_implementation=attn)

    bs, accum = cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps
    train_loader = make_loader(train_rows, bs, collate, cfg.train.seed)
    # Each process evaluates its own slice: exact sums, no padding duplicates from a sharded loader.
    eval_shard = eval_rows[accelerator.process_index::accelerator.num_processes]
    eval_loader = make_loader(eval_shard, bs, collate, cfg.train.seed, shuffle=False) if eval_rows else None
    _, total_steps = engine.plan_steps(len(train_rows), accelerator, cfg.train)
    optimizer, scheduler = engine.make_optimizer(model, cfg.train, total_steps)
    model, optimizer, train_loader = engine.prepare(accelerator, model, optimizer, train_loader)
    step, _, logger = engine.start_run(accelerator, cfg, {"model": model}, {"model": optimizer}, {"model": scheduler})

    eval_before = evaluate(model, eval_loader, accelerator) if eval_loader is not None and step == 0 else None
    if eval_before is not None:
        logger.log({"eval/loss": eval_before}, step=0)

    model.train()
    bar = engine.progress(accelerator, total_steps, initial=step, desc="sft", enabled=cfg.log.progress)
    world = accelerator.num_processes
    start, tokens_seen, last_log = time.time(), 0, {}
    groups = engine.micro_batch_groups(accelerator, train_loader, step, accum)
    while step < total_steps:
        epoch, group = next(groups)
        num_tokens = [mb.pop("num_tokens") for mb in group]
        # Normalise by the answer tokens of the whole global batch, so every token weighs the same.
        local_tokens = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in group)
        global_tokens = accelerator.reduce(local_tokens.clone(), "sum").clamp(min=1)
        loss_total = torch.zeros((), device=accelerator.device)
        for i, mb in enumerate(group):
            labels = mb.pop("labels")
            sync = i == len(group) - 1
            with nullcontext() if sync else engine.no_sync(accelerator, model):
                logits = model(**mb).logits
                loss_sum, _ = sft_token_loss(logits, labels)
                # DDP averages gradients over processes; multiply back so the result is the global token mean.
                accelerator.backward(loss_sum * world / global_tokens)
            loss_total += loss_sum.detach()
            tokens_seen += int(num_tokens[i])
        train_loss = accelerator.reduce(loss_total, "sum") / global_tokens
        engine.check_finite(train_loss, "training loss", step, cfg.output_dir)
        grad_norm = engine.optimizer_step(accelerator, model.parameters(), optimizer, scheduler, cfg.train.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            elapsed = time.time() - start
            last_log = {"train/loss": train_loss.item(), "train/grad_norm": float(grad_norm),
                        "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch,
                        "train/tokens_per_second": tokens_seen * world / max(elapsed, 1e-9)}
            logger.log(last_log, step=step)
            bar.set_postfix(loss=f"{train_loss.item():.4f}")
        if eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            logger.log({"eval/loss": evaluate(model, eval_loader, accelerator)}, step=step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            engine.save_checkpoint(accelerator, cfg.output_dir, step, {"model": model}, {"model": optimizer},
                                   {"model": scheduler}, {"epoch": epoch}, keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    eval_after = evaluate(model, eval_loader, accelerator) if eval_loader is not None else None
    if eval_after is not None:
        logger.log({"eval/loss": eval_after}, step=step)
    final_dir = os.path.join(cfg.output_dir, "final")
    engine.save_final(accelerator, model, tokenizer, final_dir, cfg.model)
    summary = {
        "stage": "sft", "steps": step, "train_loss": last_log.get("train/loss"),
        "eval_loss_before": eval_before, "eval_loss_after": eval_after, "runtime_seconds": round(runtime, 2),
        "tokens_per_second": last_log.get("train/tokens_per_second"), "trainable_parameters": trainable,
        "total_parameters": total, "num_processes": world, "rows": row_accounts, "data": data_stats,
        "final_dir": final_dir,
    }
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    engine.end_training(accelerator)
    return summary
