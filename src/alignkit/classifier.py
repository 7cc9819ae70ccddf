"""An evaluator model (Llama Guard style): good/bad judge of an answer, with an optional category.

    alignkit classifier --config configs/classifier/tiny.yaml
    accelerate launch scripts/train_classifier.py --config configs/classifier/tiny.yaml
    alignkit data filter --judge runs/classifier-tiny/final in.jsonl kept.jsonl      # drop rows judged bad

Trained on binary labels (``{"kind": "binary", "answer": 0, "good": false, "category": "insult"}``,
or ``{prompt, completion, label}`` rows); several annotators are aggregated as in the reward stage
(majority or Dawid-Skene; a bad answer's category is the most common one among its bad votes).

Reads top to bottom: accelerator -> tokenizer -> data (validated before the model loads) -> model
-> fit -> evaluate -> save. The model is a plain ``AutoModelForSequenceClassification`` with
``2 + C`` outputs read at the answer's last token: ``good``, ``bad`` (a softmax pair: P(good)) and
one logit per configured category (a softmax over categories, trained on bad answers that name
one). Its ``config.json`` carries ``alignkit_classifier`` (categories, threshold) and an
``alignkit_reward`` block whose weights (+1 good, -1 bad, 0 categories) make every alignkit reward
reader score it as ``logit P(good)``: it is a PPO reward source as it stands
(``reward.sources: [{name_or_path: runs/classifier-tiny/final, weight: 0.5}]``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, NamedTuple

import torch
import torch.nn.functional as F

from alignkit import engine
from alignkit.config import ConfigError, DataConfig, LogConfig, ModelConfig, TrainConfig, check_packing
from alignkit.dpo import AnswerEncoder
from alignkit.modeling import (
    ModelLoadError,
    backbone_and_head,
    check_packing_window,
    count_parameters,
    load_model,
    load_tokenizer,
)
from alignkit.rewards import score_sequences
from alignkit.rm import RewardForward, save_reward_model
from alignkit.rm_data import OVERALL, RMElement, aggregate, pack_elements
from alignkit.schema import DataError, Example, feedback_counts, prepare_splits
from alignkit.sft import EpochSampler
from alignkit.tokenization import right_pad


@dataclass
class ClassifierSettings:
    # Categories a bad answer may name (Llama Guard's taxonomy, or your own); empty: good/bad only.
    categories: List[str] = field(default_factory=list)
    # Weight of the category cross-entropy beside the good/bad one.
    category_weight: float = 1.0
    # P(good) under this is judged bad (stored with the model; `alignkit data filter` uses it by default).
    threshold: float = 0.5
    # Several annotators on one answer: aggregate their labels first, or train on each label (each).
    annotators: str = "aggregate"
    aggregation: str = "majority"
    # Binary labels of this aspect are used (no aspect = "overall").
    aspect: str = OVERALL
    # Equal-width P(good) bins for the calibration report (expected calibration error).
    calibration_bins: int = 10

    def __post_init__(self):
        if len(set(self.categories)) != len(self.categories):
            raise ConfigError(f"classifier.categories: duplicates in {list(self.categories)}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"classifier.threshold: must be in (0, 1), got {self.threshold}")
        if self.annotators not in ("aggregate", "each"):
            raise ConfigError(f"classifier.annotators: must be aggregate or each, got {self.annotators!r}")
        if self.aggregation not in ("majority", "dawid_skene"):
            raise ConfigError(f"classifier.aggregation: must be majority or dawid_skene, got {self.aggregation!r}")
        if self.calibration_bins < 1:
            raise ConfigError("classifier.calibration_bins: must be >= 1")


@dataclass
class ClassifierConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # packing: answers of a micro-batch share rows (rm_data.pack_elements).
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=["builtin:binary"],
                                                                eval_files=["builtin:binary:eval"]))
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    output_dir: str = "runs/classifier"

    def __post_init__(self):
        check_packing(self.model, self.data)


# ----------------------------------------------------------------------------- data


class Judged(NamedTuple):
    sequence: list[int]  # prompt + answer token ids
    good: bool
    category: int  # index into classifier.categories, -1 when none is named
    source: str


def _categories_by_answer(examples: list[Example], s: ClassifierSettings) -> tuple[dict, list[str]]:
    """Most common category among each answer's bad votes, and every undeclared category as a problem."""
    votes, problems = defaultdict(Counter), []
    for ex in examples:
        for i, lab in enumerate(ex.labels):
            if lab.kind != "binary" or lab.category is None:
                continue
            if lab.good:
                problems.append(f"{ex.source}: labels[{i}].category: {lab.category!r} on a good answer; categories "
                                "say what is wrong with a bad one")
            elif lab.category not in s.categories:
                problems.append(f"{ex.source}: labels[{i}].category: {lab.category!r} is not among "
                                f"classifier.categories {list(s.categories)}")
            else:
                votes[(ex.source, lab.answer)][lab.category] += 1
    return {k: c.most_common(1)[0][0] for k, c in votes.items()}, problems


def classifier_items(examples: list[Example], s: ClassifierSettings, tokenizer, data: DataConfig, where: str):
    """Binary labels -> one item per judged answer; every problem is raised together."""
    counts = feedback_counts(examples)
    if not counts["binary"]:
        found = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing"
        raise DataError([f"{where}: labels: the classifier needs binary good/bad labels (or {{prompt, completion, "
                         f"label}} rows), found {found}"])
    examples = [Example(prompt=ex.prompt, answers=ex.answers, id=ex.id, meta=ex.meta, source=ex.source,
                        labels=[lab for lab in ex.labels if lab.kind == "binary" and (lab.aspect or OVERALL) == s.aspect])
                for ex in examples]
    category_of, problems = _categories_by_answer(examples, s)
    if problems:
        raise DataError(problems)
    if s.annotators == "aggregate":
        examples = aggregate(examples, s.aggregation)
    encode, items = AnswerEncoder(tokenizer, data), []
    for ex in examples:
        for lab in ex.labels:
            enc = encode(ex, ex.answers[lab.answer])
            if enc is None:
                continue
            category = category_of.get((ex.source, lab.answer)) if not lab.good else None
            if s.annotators == "each":
                category = lab.category
            items.append(Judged(enc[0], bool(lab.good), s.categories.index(category) if category else -1, ex.source))
    if encode.problems:
        raise DataError(encode.problems)
    stats = {"answers": len(items), "good": sum(it.good for it in items),
             "by_category": dict(Counter(s.categories[it.category] for it in items if it.category >= 0))}
    return items, stats


def prepare_data(cfg: ClassifierConfig, tokenizer):
    """Train and eval items (one answer and its verdict each); all problems raised before any model loads."""
    def build(examples, split, files):
        return classifier_items(examples, cfg.classifier, tokenizer, cfg.data, ", ".join(files))

    return prepare_splits(cfg.data, cfg.train.seed, "classifier", build)


def collate(items: list[Judged], pad_token_id: int, max_length: int, packing: bool,
            attn_implementation: str | None = "sdpa") -> dict:
    elements = [RMElement([it.sequence], [], [], it.source) for it in items]
    if packing:
        batch = pack_elements(elements, pad_token_id, 1, max_length, share_prefix=False,
                              attn_implementation=attn_implementation)
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "read_index")}
    else:
        input_ids, attention_mask = right_pad([it.sequence for it in items], pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return {**batch, "bad": torch.tensor([int(not it.good) for it in items]),
            "category": torch.tensor([it.category for it in items])}


# ----------------------------------------------------------------------------- maths


def judge_loss_sum(logits, bad, category, category_weight: float) -> torch.Tensor:
    """Summed loss of a micro-batch: CE over (good, bad) + category_weight * CE over the categories of
    answers that name one. logits (N, 2 + C); bad (N,) 0/1; category (N,) index or -1."""
    loss = F.cross_entropy(logits[:, :2].float(), bad, reduction="sum")
    named = category >= 0
    if logits.shape[1] > 2 and named.any():
        loss = loss + category_weight * F.cross_entropy(logits[named, 2:].float(), category[named], reduction="sum")
    return loss


def p_good(raw: torch.Tensor) -> torch.Tensor:
    """P(good) (N,) from raw outputs (N, 2 + C): softmax over the (good, bad) pair."""
    return torch.softmax(raw[:, :2].float(), -1)[:, 0]


def judge_metrics(prob_good, good, pred_category, category, categories: list[str], threshold: float, bins: int):
    """Held-out accuracy, Brier score, expected calibration error and per-category precision/recall.

    prob_good (N,) float; good (N,) bool; pred_category, category (N,) long (category -1: none named).
    A category counts as predicted for an answer judged bad (P(good) < threshold) whose top category
    it is, as Llama Guard evaluates its taxonomy; recall is over bad answers labelled with it.
    ECE = sum_b (n_b / N) |mean P(good) in bin b - share good in bin b| (Guo et al. 2017).
    """
    judged_bad = prob_good < threshold
    truth = good.float()
    out = {"answers": len(good), "accuracy": ((~judged_bad) == good).float().mean().item(),
           "brier": (prob_good - truth).pow(2).mean().item(), "share_good": truth.mean().item()}
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(prob_good.clamp(0, 1), edges[1:-1], right=True)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        mean_p, frac = prob_good[sel].mean().item(), truth[sel].mean().item()
        ece += sel.float().mean().item() * abs(mean_p - frac)
        table.append({"bin": [round(edges[b].item(), 3), round(edges[b + 1].item(), 3)], "answers": int(sel.sum()),
                      "mean_p_good": mean_p, "share_good": frac})
    out["ece"], out["calibration"] = ece, table
    per = {}
    for c, name in enumerate(categories):
        predicted = judged_bad & (pred_category == c)
        actual = (~good) & (category == c)
        tp = (predicted & actual).sum().item()
        per[name] = {"precision": tp / predicted.sum().item() if predicted.any() else None,
                     "recall": tp / actual.sum().item() if actual.any() else None,
                     "support": int(actual.sum()), "predicted": int(predicted.sum())}
    out["by_category"] = per
    return out


@torch.no_grad()
def evaluate(model, items: list[Judged], s: ClassifierSettings, pad_token_id: int, batch_size: int = 32) -> dict:
    raw = score_sequences(model, [it.sequence for it in items], pad_token_id, batch_size)
    pred_category = raw[:, 2:].argmax(-1) if raw.shape[1] > 2 else torch.full((len(items),), -1)
    return judge_metrics(p_good(raw), torch.tensor([it.good for it in items]), pred_category,
                         torch.tensor([it.category for it in items]), list(s.categories), s.threshold,
                         s.calibration_bins)


# ----------------------------------------------------------------------------- training


def train_classifier(cfg: ClassifierConfig) -> dict:
    s = cfg.classifier
    accelerator = engine.make_accelerator(cfg.train, cfg.log, cfg.output_dir)
    engine.seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_items, eval_items, data_stats = prepare_data(cfg, tokenizer)
    row_accounts = data_stats.pop("rows")

    n_out = 2 + len(s.categories)
    model = load_model(cfg.model, task="reward", num_labels=n_out, pad_token_id=tokenizer.pad_token_id)
    check_packing_window(model, cfg.data)
    model.config.use_cache = False  # no KV cache while training
    engine.use_fp32_attention_on_cpu(model, accelerator)
    trainable, total = count_parameters(model)
    packing = cfg.data.packing and backbone_and_head(model) is not None

    bs, accum = cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps
    train_loader = torch.utils.data.DataLoader(
        train_items, batch_size=bs, sampler=EpochSampler(len(train_items), cfg.train.seed),
        collate_fn=lambda items: collate(items, tokenizer.pad_token_id, cfg.data.max_length, packing,
                                         model.config._attn_implementation))
    steps_per_epoch, total_steps = engine.plan_steps(len(train_items), accelerator, cfg.train)
    optimizer, scheduler = engine.make_optimizer(model, cfg.train, total_steps)
    forward, optimizer, train_loader = accelerator.prepare(RewardForward(model, model.config.pad_token_id), optimizer,
                                                           train_loader)
    step, _, logger = engine.start_run(accelerator, cfg, {"model": model}, {"model": optimizer}, {"model": scheduler})

    def run_eval(at_step):
        metrics = evaluate(model, eval_items, s, tokenizer.pad_token_id)
        logger.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=at_step)
        return metrics

    eval_before = run_eval(0) if eval_items and step == 0 and accelerator.is_main_process else None

    forward.train()
    bar = engine.progress(accelerator, total_steps, initial=step, desc="classifier", enabled=cfg.log.progress)
    world = accelerator.num_processes
    start, seen, last_log = time.time(), 0, {}
    epoch = step // steps_per_epoch
    batches = _micro_batches(accelerator, train_loader, epoch, skip=(step % steps_per_epoch) * accum)
    while step < total_steps:
        group = []
        for _ in range(accum):
            mb = next(batches, None)
            if mb is None:  # epoch ended: next epoch's order
                epoch += 1
                batches = _micro_batches(accelerator, train_loader, epoch, skip=0)
                mb = next(batches)
            group.append(mb)
        # Every answer of the global batch weighs the same.
        global_n = accelerator.reduce(torch.tensor(float(sum(len(mb["bad"]) for mb in group)),
                                                   device=accelerator.device), "sum").clamp(min=1)
        loss_total, correct = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for i, mb in enumerate(group):
            with nullcontext() if i == len(group) - 1 else accelerator.no_sync(forward):
                logits = forward(mb["input_ids"], mb["attention_mask"], mb.get("position_ids"), mb.get("read_index"))
                loss_sum = judge_loss_sum(logits, mb["bad"], mb["category"], s.category_weight)
                accelerator.backward(loss_sum * world / global_n)
            loss_total += loss_sum.detach()
            correct += ((p_good(logits.detach()) < 0.5).long() == mb["bad"]).sum()
            seen += len(mb["bad"])
        train_loss = accelerator.reduce(loss_total, "sum") / global_n
        engine.check_finite(train_loss, "training loss", step, cfg.output_dir)
        grad_norm = engine.optimizer_step(accelerator, forward.parameters(), optimizer, scheduler,
                                          cfg.train.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            acc = accelerator.reduce(correct.float(), "sum") / global_n
            last_log = {"train/loss": train_loss.item(), "train/accuracy": acc.item(),
                        "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": epoch,
                        "train/answers_per_second": seen * world / max(time.time() - start, 1e-9)}
            logger.log(last_log, step=step)
            bar.set_postfix(loss=f"{train_loss.item():.4f}", acc=f"{acc.item():.3f}")
        if eval_items and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps \
                and accelerator.is_main_process:
            run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            engine.save_checkpoint(accelerator, cfg.output_dir, step, {"model": model}, {"model": optimizer},
                                   {"model": scheduler}, {"epoch": epoch}, keep=cfg.train.keep_checkpoints)
    bar.close()
    runtime = time.time() - start

    accelerator.wait_for_everyone()
    eval_after, final_dir = None, os.path.join(cfg.output_dir, "final")
    if accelerator.is_main_process:
        eval_after = run_eval(step) if eval_items else None
        save_judge(model, tokenizer, cfg)
    summary = {
        "stage": "classifier", "steps": step, "train_loss": last_log.get("train/loss"),
        "train_accuracy": last_log.get("train/accuracy"), "eval_before": eval_before, "eval": eval_after,
        "categories": list(s.categories), "threshold": s.threshold, "runtime_seconds": round(runtime, 2),
        "answers_per_second": last_log.get("train/answers_per_second"), "trainable_parameters": trainable,
        "total_parameters": total, "num_processes": world, "rows": row_accounts, "data": data_stats,
        "final_dir": final_dir,
    }
    if accelerator.is_main_process:
        engine.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    accelerator.wait_for_everyone()
    engine.end_training(accelerator)
    return summary


def save_judge(model, tokenizer, cfg: ClassifierConfig) -> str:
    """``output_dir/final``: a sequence classifier whose alignkit_reward weights read logit P(good)."""
    cats = list(cfg.classifier.categories)
    n = 2 + len(cats)
    info = {"aspects": ["good", "bad", *[f"category:{c}" for c in cats]], "weights": [1.0, -1.0] + [0.0] * len(cats),
            "offset": [0.0] * n, "scale": [1.0] * n}
    final_dir = save_reward_model(model, tokenizer, cfg, info)
    path = os.path.join(final_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["alignkit_classifier"] = {"categories": cats, "threshold": cfg.classifier.threshold,
                                     "score": "logit P(good) = output 'good' - output 'bad'"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return final_dir


def _micro_batches(accelerator, loader, epoch: int, skip: int):
    loader.set_epoch(epoch)
    yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)


# ----------------------------------------------------------------------------- as a judge


class Judge:
    """A saved classifier read on text: ``judge(prompts, responses) -> (P(good) (B,), category names)``.

    Scores through ``alignkit.rewards.ModelReward`` (the one reader of sequence-classification
    models on re-tokenized text), so a judge and a reward source read the same numbers.
    """

    def __init__(self, path: str, device="cpu", batch_size: int = 32):
        from transformers import AutoConfig

        from alignkit.modeling import resolve_path
        from alignkit.rewards import ModelReward, RewardSourceConfig

        info = AutoConfig.from_pretrained(resolve_path(path)).to_dict().get("alignkit_classifier")
        if info is None:
            raise ModelLoadError(f"judge {path}: no alignkit_classifier block in its config.json (train it with "
                                 "`alignkit classifier`; pass its output_dir/final)")
        self.categories, self.threshold = list(info["categories"]), float(info["threshold"])
        self.reader = ModelReward(RewardSourceConfig(name_or_path=path), device=device, batch_size=batch_size)

    def __call__(self, prompts, responses) -> tuple[torch.Tensor, list]:
        raw = self.reader.raw_scores(list(prompts), list(responses))
        prob = p_good(raw)
        cats = [None] * len(prob)
        if self.categories:
            top = raw[:, 2:].argmax(-1).tolist()
            cats = [self.categories[c] if p < self.threshold else None for c, p in zip(top, prob.tolist())]
        return prob, cats


def filter_examples(examples: list[Example], judge: Judge, threshold: float | None = None):
    """Drop every row with an answer the judge finds bad (P(good) < threshold); prompt-only rows stay.

    Returns (kept rows, stats with the number of rows dropped per category)."""
    threshold = judge.threshold if threshold is None else threshold
    prompts = [ex.prompt for ex in examples for _ in ex.answers]
    answers = [a for ex in examples for a in ex.answers]
    prob, cats = judge(prompts, answers) if answers else (torch.zeros(0), [])
    kept, dropped, by_category, k = [], 0, Counter(), 0
    for ex in examples:
        mine = prob[k:k + len(ex.answers)]
        bad = [c for p, c in zip(mine.tolist(), cats[k:k + len(ex.answers)]) if p < threshold]
        k += len(ex.answers)
        if bad:
            dropped += 1
            by_category.update(c or "bad" for c in bad[:1])
        else:
            kept.append(ex)
    return kept, {"rows": len(examples), "kept": len(kept), "dropped": dropped, "threshold": threshold,
                  "dropped_by_category": dict(by_category)}
