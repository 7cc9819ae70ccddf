"""Reward model: Bradley-Terry on pairs, rankings and ratings, one score per aspect (InstructGPT step 2).

    alignkit rm --config configs/rm/tiny.yaml
    accelerate launch scripts/train_rm.py --config configs/rm/tiny.yaml

Reads top to bottom: accelerator -> tokenizer -> data (validated, aggregated and turned
into comparisons before the model loads; ``alignkit.rm_data``) -> model -> fit ->
normalise -> evaluate (``alignkit.rm_eval``) -> save.

Each answer goes through the model once and the loss is averaged over each prompt's
pairs first, then over the prompts of the global batch (Ouyang et al. 2022, sec. 3.5).
Training packs by default: a micro-batch's answers share rows, each prompt once with its
answers branching off it (``rm_data.pack_elements``), and each answer's score is read
through the score head at its own read position (``RewardForward``): the same numbers as
the padded forward. Under bf16 on CPU attention runs in fp32 (``engine.use_fp32_attention_on_cpu``).

Scores are read at the rightmost non-pad token (``alignkit.rewards``, the one reader of
every stage), as ``AutoModelForSequenceClassification`` pools, so ``output_dir/final``
loads there and gives the same raw scores. Its ``config.json`` carries ``alignkit_reward``:
``{"aspects", "weights", "offset", "scale"}``; normalised = (raw - offset) / scale per
aspect, and "the reward" = sum(weights * normalised).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from alignkit import engine
from alignkit.config import DataConfig, LogConfig, ModelConfig, TrainConfig, check_packing
from alignkit.losses import centering_loss, pairwise_ranking_loss, plackett_luce_loss
from alignkit.modeling import (
    backbone_and_head,
    check_packing_window,
    count_parameters,
    export_merged,
    head_outputs,
    is_peft,
    load_model,
    load_tokenizer,
)
from alignkit.plots import plot_distributions
from alignkit.rewards import reward_scores, score_sequences
from alignkit.rm_data import RewardSettings, collate_elements, pack_elements, prepare_rm_data, reference_sequences
from alignkit.rm_eval import evaluate
from alignkit.sft import make_loader


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # packing: pack each micro-batch's answers into rows (prompt once per element, tree mask; see pack_elements).
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=["builtin:pairs"], packing=True))
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rm: RewardSettings = field(default_factory=RewardSettings)
    output_dir: str = "runs/rm"

    def __post_init__(self):
        check_packing(self.model, self.data)


class RewardForward(torch.nn.Module):
    """The training forward: (N, aspects) raw rewards of a micro-batch, padded or packed.

    Padded (``collate_elements``): ``rewards.reward_scores``, the reader every stage uses.
    Packed (``pack_elements``): the score head at each answer's ``read_index`` in the packed
    rows -- the same numbers, since the head is applied per token. This wrapper is what
    accelerate prepares (DDP, autocast); the wrapped model stays a standard sequence classifier.
    """

    def __init__(self, model, pad_token_id: int | None):
        super().__init__()
        self.model, self.pad_token_id = model, pad_token_id

    def forward(self, input_ids, attention_mask, position_ids=None, read_index=None):
        if read_index is None:
            return reward_scores(self.model, input_ids, attention_mask, self.pad_token_id)
        return head_outputs(self.model, input_ids, attention_mask, position_ids, read_index=read_index)


class LossTerms(NamedTuple):
    group_loss_sum: torch.Tensor  # sum over this micro-batch's groups of each group's mean loss
    correct: torch.Tensor  # number of untied pairs scored the right way round
    pairs: torch.Tensor  # number of untied pairs


def rm_loss_terms(rewards: torch.Tensor, batch: dict) -> LossTerms:
    """rewards: (N, A) raw scores of the batch's answers -> the summed per-group losses.

    Pairs use ``pairwise_ranking_loss`` (mean over each prompt's pairs); each Plackett-Luce
    ranking is its own group. The caller divides by the number of groups in the global batch.
    """
    flat = rewards.float().flatten()
    total = flat.new_zeros(())
    correct = flat.new_zeros(())
    n_pairs = flat.new_zeros(())
    if batch["winners"].numel():
        mean, right = pairwise_ranking_loss(flat, batch["winners"], batch["losers"], group=batch["group"],
                                            margin=batch["margin"], tie=batch["tie"])
        total = total + mean * batch["group"].unique().numel()
        untied = ~batch["tie"]
        correct = (right & untied).sum().float()
        n_pairs = untied.sum().float()
    if batch["rankings"].numel():
        ranked = flat[batch["rankings"]]  # (R, K) scores, best first
        total = total + plackett_luce_loss(ranked, batch["ranking_mask"]) * batch["rankings"].shape[0]
        # Accuracy over the implied pairs of each ranking.
        i, j = torch.triu_indices(ranked.shape[1], ranked.shape[1], 1)
        valid = batch["ranking_mask"][:, i] & batch["ranking_mask"][:, j]
        correct = correct + ((ranked[:, i] > ranked[:, j]) & valid).sum()
        n_pairs = n_pairs + valid.sum()
    return LossTerms(total, correct, n_pairs)


# ----------------------------------------------------------------------------- normalisation


def normalization_stats(model, sequences, pad_token_id) -> tuple[list[float], list[float]]:
    raw = score_sequences(model, sequences, pad_token_id)
    offset = raw.mean(0)
    scale = raw.std(0) if raw.shape[0] > 1 else torch.ones_like(offset)
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))  # a constant scorer keeps scale 1
    return offset.tolist(), scale.tolist()


# ----------------------------------------------------------------------------- training


def ensemble_dirs(cfg: RMConfig) -> list[str]:
    """Output folders of the ``rm.ensemble`` reward models: output_dir, then output_dir/member_<i>."""
    return [cfg.output_dir] + [os.path.join(cfg.output_dir, f"member_{i}") for i in range(1, cfg.rm.ensemble)]


def ensemble_member(cfg: RMConfig, i: int) -> RMConfig:
    """The config of the ensemble's i-th reward model: its own folder and seed train.seed + i."""
    return replace(cfg, output_dir=ensemble_dirs(cfg)[i], rm=replace(cfg.rm, ensemble=1),
                   train=replace(cfg.train, seed=cfg.train.seed + i))


def train_rm(cfg: RMConfig) -> dict:
    """Train the reward model (``rm.ensemble`` > 1: that many, one seed each); returns the first's summary."""
    if cfg.rm.ensemble == 1:
        return train_one_rm(cfg)
    summaries = []
    for i in range(cfg.rm.ensemble):
        summaries.append(train_one_rm(ensemble_member(cfg, i)))
    first = summaries[0]
    first["ensemble"] = [{"final_dir": s["final_dir"], "seed": cfg.train.seed + i, "eval": s["eval"]}
                         for i, s in enumerate(summaries)]
    if int(os.environ.get("RANK", "0")) == 0:  # the processes have finished (train_one_rm waits for all)
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), first)
    return first


def train_one_rm(cfg: RMConfig) -> dict:
    accelerator = engine.make_accelerator(cfg.train, cfg.log, cfg.output_dir)
    engine.seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_elements, eval_elements, data_stats, train_examples = prepare_rm_data(cfg, tokenizer)
    row_accounts = data_stats.pop("rows")
    ref_sequences, ref_what = reference_sequences(cfg, tokenizer, train_examples)
    del train_examples

    aspects, A = list(cfg.rm.aspects), len(cfg.rm.aspects)
    model = load_model(cfg.model, task="reward", num_labels=A, pad_token_id=tokenizer.pad_token_id)
    check_packing_window(model, cfg.data)
    model.config.use_cache = False  # no KV cache while training
    engine.use_fp32_attention_on_cpu(model, accelerator)
    trainable, total = count_parameters(model)
    model = engine.shard(model, accelerator, cfg.train)  # FSDP2 when train.sharding=fsdp2: optimizer on the shards
    # `model` stays the plain sequence classifier (evaluated, checkpointed and saved as such); accelerate
    # prepares the training forward around it. Packed, each answer's score is read at its own read position.
    packed = cfg.data.packing and backbone_and_head(model) is not None
    pad_id, attn = model.config.pad_token_id, model.config._attn_implementation

    def collate(elements):
        if packed:
            return pack_elements(elements, pad_id, A, cfg.data.max_length, attn_implementation=attn)
        return collate_elements(elements, pad_id, A)

    bs, accum = cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps
    train_loader = make_loader(train_elements, bs, collate, cfg.train.seed)
    _, total_steps = engine.plan_steps(len(train_elements), accelerator, cfg.train)
    optimizer, scheduler = engine.make_optimizer(model, cfg.train, total_steps)
    forward, optimizer, train_loader = engine.prepare(accelerator, RewardForward(model, pad_id), optimizer,
                                                      train_loader)
    step, _, logger = engine.start_run(accelerator, cfg, {"model": model}, {"model": optimizer}, {"model": scheduler})
    # Until the normalisation is measured after training, evaluate the raw scores with the configured weights.
    info = {"aspects": aspects, "weights": cfg.rm.weights, "offset": [0.0] * A, "scale": [1.0] * A}

    def run_eval(at_step):
        with engine.gathered(model):  # processes may score different numbers of answers
            metrics, dists = evaluate(model, eval_elements, info, pad_id, accelerator)
        logger.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=at_step)
        return metrics, dists

    eval_before = run_eval(0)[0] if eval_elements and step == 0 else None

    forward.train()
    bar = engine.progress(accelerator, total_steps, initial=step, desc="rm", enabled=cfg.log.progress)
    world = accelerator.num_processes
    start, pairs_seen, answers_seen, last_log = time.time(), 0, 0, {}
    groups = engine.micro_batch_groups(accelerator, train_loader, step, accum)
    while step < total_steps:
        epoch, group = next(groups)
        # Every prompt (group) of the global batch weighs the same, whatever the micro-batch or process.
        local_groups = sum(mb["num_groups"] for mb in group).to(accelerator.device).float()
        global_groups = accelerator.reduce(local_groups.clone(), "sum").clamp(min=1)
        loss_total = torch.zeros((), device=accelerator.device)
        correct, n_pairs = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for i, mb in enumerate(group):
            sync = i == len(group) - 1
            with nullcontext() if sync else engine.no_sync(accelerator, forward):
                rewards = forward(mb["input_ids"], mb["attention_mask"], mb.get("position_ids"),
                                  mb.get("read_index"))  # (N, A)
                terms = rm_loss_terms(rewards, mb)
                # DDP averages gradients over processes; multiply back so the result is the global group mean.
                loss = terms.group_loss_sum * world / global_groups
                if cfg.rm.center_coef:
                    loss = loss + cfg.rm.center_coef * centering_loss(rewards.float()) / len(group)
                accelerator.backward(loss)
            loss_total += terms.group_loss_sum.detach()
            correct += terms.correct
            n_pairs += terms.pairs
            pairs_seen += int(terms.pairs)
            answers_seen += mb["read_index"].numel() if packed else mb["input_ids"].shape[0]
        train_loss = accelerator.reduce(loss_total, "sum") / global_groups
        engine.check_finite(train_loss, "training loss", step, cfg.output_dir)
        grad_norm = engine.optimizer_step(accelerator, forward.parameters(), optimizer, scheduler, cfg.train.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            elapsed = time.time() - start
            acc = accelerator.reduce(correct, "sum") / accelerator.reduce(n_pairs, "sum").clamp(min=1)
            last_log = {"train/loss": train_loss.item(), "train/accuracy": acc.item(),
                        "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": epoch, "train/pairs_per_second": pairs_seen * world / max(elapsed, 1e-9),
                        "train/answers_per_second": answers_seen * world / max(elapsed, 1e-9)}
            logger.log(last_log, step=step)
            bar.set_postfix(loss=f"{train_loss.item():.4f}", acc=f"{acc.item():.3f}")
        if eval_elements and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            engine.save_checkpoint(accelerator, cfg.output_dir, step, {"model": model}, {"model": optimizer},
                                   {"model": scheduler}, {"epoch": epoch}, keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    # InstructGPT: shift (and scale) so the reference answers score mean 0, std 1 per aspect.
    with engine.gathered(model):
        offset, scale = normalization_stats(model, ref_sequences, pad_id)
    info = {"aspects": aspects, "weights": cfg.rm.weights, "offset": offset, "scale": scale}
    eval_after, dists = run_eval(step) if eval_elements else (None, {})
    accelerator.wait_for_everyone()
    final_dir = os.path.join(cfg.output_dir, "final")
    plot = None
    state = engine.full_state(model)  # a sharded model's weights, gathered on rank 0
    if accelerator.is_main_process:
        save_reward_model(model, tokenizer, cfg, info, state_dict=state)
        plot = plot_distributions(dists, os.path.join(cfg.output_dir, "reward_distributions.png"))
    summary = {
        "stage": "rm", "steps": step, "train_loss": last_log.get("train/loss"),
        "train_accuracy": last_log.get("train/accuracy"), "eval_before": eval_before, "eval": eval_after,
        "normalization": {"offset": offset, "scale": scale, "reference": ref_what, "answers": len(ref_sequences)},
        "aspects": aspects, "weights": cfg.rm.weights, "runtime_seconds": round(runtime, 2),
        "pairs_per_second": last_log.get("train/pairs_per_second"), "trainable_parameters": trainable,
        "total_parameters": total, "num_processes": world, "rows": row_accounts, "data": data_stats,
        "final_dir": final_dir, "distributions_png": plot,
    }
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    accelerator.wait_for_everyone()
    engine.end_training(accelerator)
    return summary


def save_reward_model(model, tokenizer, cfg: RMConfig, info: dict, state_dict: dict | None = None) -> str:
    """Write ``output_dir/final`` (a plain AutoModelForSequenceClassification folder whose config carries
    ``alignkit_reward``) and, with LoRA, ``output_dir/final_adapter`` (adapter + fully trained score head);
    ``final`` is then the merged model."""
    final_dir = os.path.join(cfg.output_dir, "final")
    aspects = info["aspects"]
    label_maps = {"id2label": dict(enumerate(aspects)), "label2id": {a: i for i, a in enumerate(aspects)}}
    if is_peft(model):
        adapter_dir = os.path.join(cfg.output_dir, "final_adapter")
        model.save_pretrained(adapter_dir, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_dir)
        engine.write_json(os.path.join(adapter_dir, "alignkit_reward.json"), info)
        export_merged(adapter_dir, final_dir, cfg.model, num_labels=len(info["aspects"]))
        path = os.path.join(final_dir, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config.update(label_maps, alignkit_reward=info, use_cache=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    else:
        model.config.alignkit_reward = info
        model.config.id2label, model.config.label2id = label_maps["id2label"], label_maps["label2id"]
        model.config.use_cache = True
        model.save_pretrained(final_dir, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(final_dir)
    return final_dir


