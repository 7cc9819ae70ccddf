"""One stage of the TRL pipeline on alignkit's built-in task, under a wall-clock budget (child of bench_pipeline_trl.py).

    /work/venv/bin/python benchmarks/trl_pipeline_worker.py --stage sft --out D/sft --budget 11 --settings '{...}'
    /work/venv/bin/python benchmarks/trl_pipeline_worker.py --stage rm --sft D/sft --out D/rm --budget 14 --settings ...
    /work/venv-trl112/bin/python benchmarks/trl_pipeline_worker.py --stage ppo --sft D/sft --rm D/rm --out D/ppo \\
        --budget 45 --extend 2 --settings ...

Started by ``benchmarks/bench_pipeline_trl.py``, which passes the quickstart's hyperparameters
as ``--settings`` JSON. SFT and RM run on TRL 1.16 (/work/venv), PPO on TRL 1.12
(``trl.experimental.ppo``, /work/venv-trl112: TRL 1.13+ has no PPO). Each stage prints one
``BENCH_RESULT {json}`` line with its seconds (from the start of the stage function: model
loading, data preparation, training and saving; interpreter start-up and imports excluded, as
in alignkit's own per-stage timings).

The budget: a callback stops training before the step that would end past ``--budget``
seconds. PPO with ``--extend K`` saves the policy at that point (``out/ppo_1x``) and carries on
to K times as many updates (``out/ppo_Kx``); with a constant learning rate and seeded sampling the
first snapshot is exactly what a run of one budget would return.

Data are alignkit's built-in rows, formatted the way a TRL user would pass them: the prompt is
the chat-templated text (``<|user|> review the pizza <|assistant|>``), the completion a space
plus the answer, so TRL appends EOS itself (its conversational path does not add EOS with this
chat template, and a policy that never learns to stop cannot write a well-formed answer). The
token ids equal alignkit's ``encode_prompt`` + ``encode_answer`` (checked below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


class BudgetReached(Exception):
    """Raised from a callback to leave TRL 1.12's PPO loop, which ignores ``control.should_training_stop``."""


def budget_callback(stage_start: float, budget: float, on_budget=None):
    """Stop before the optimizer step (SFT/RM) or PPO update that would end past the budget."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.time()]  # the first step's duration must not include the start-up

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            self.marks.append(now)
            last = self.marks[-1] - self.marks[-2]
            if now - stage_start + last > budget:
                if on_budget is None:
                    control.should_training_stop = True
                else:
                    on_budget(state, control)
            return control

    return Budget()


def prompt_text(tok, messages) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_same_ids(tok, example, prompt: str, completion: str) -> None:
    """The TRL rows must tokenize to exactly what alignkit trains on (prompt ids + answer ids + EOS)."""
    from alignkit.tokenization import encode_answer, encode_prompt

    want = encode_prompt(tok, example.messages) + encode_answer(tok, example.answers[0])
    got = tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    if got != want:
        raise RuntimeError(f"TRL row tokenizes differently from alignkit's: {got} vs {want}")


# ----------------------------------------------------------------------------- SFT (TRL 1.16)


def run_sft(args, s: dict) -> dict:
    t0 = time.time()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignkit.builtin import ensure_model
    from alignkit.schema import load_examples

    model_dir = ensure_model(s["model"]) if s["model"].startswith("builtin:") else s["model"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(s["sft_files"], seed=args.seed)
    rows = []
    for ex in examples:
        rows.append({"prompt": prompt_text(tok, ex.messages), "completion": " " + ex.answers[0]})
    check_same_ids(tok, examples[0], rows[0]["prompt"], rows[0]["completion"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = SFTConfig(
        output_dir=args.out, num_train_epochs=s["sft_epochs"], per_device_train_batch_size=s["sft_batch"],
        learning_rate=s["sft_lr"], lr_scheduler_type=s["sft_scheduler"], warmup_steps=s["sft_warmup_ratio"],
        max_grad_norm=1.0, weight_decay=0.0, bf16=True, use_cpu=True, max_length=s["sft_max_length"],
        packing=True, packing_strategy="bfd", completion_only_loss=True,
        gradient_checkpointing=False,  # TRL's default (True) trades speed for memory; off is faster here
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0)
    budget = budget_callback(t0, args.budget)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[budget])
    planned = trainer.get_train_dataloader().__len__() * s["sft_epochs"]
    trainer.train()
    trainer.save_model(args.out)
    tok.save_pretrained(args.out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"stage": "sft", "seconds": time.time() - t0, "steps": trainer.state.global_step, "planned_steps": planned,
            "epochs_done": trainer.state.global_step / max(1, planned) * s["sft_epochs"],
            "last_loss": losses[-1] if losses else None, "examples": len(rows),
            "settings": "SFTTrainer packing=bfd (padding-free), bf16, completion_only_loss, no grad checkpointing"}


# ----------------------------------------------------------------------------- reward model (TRL 1.16)


def majority_pairs(examples):
    """One (chosen, rejected) per pair by majority vote of its annotators (ties and golden labels abstain).

    TRL trains on one label per pair; a TRL user aggregates the annotators first. A pair whose
    votes are even (including all-tie) is dropped.
    """
    out, dropped = [], 0
    for ex in examples:
        votes = 0
        for lab in ex.labels:
            if lab.kind != "pairwise" or lab.golden or lab.tie:
                continue
            votes += 1 if lab.chosen == 0 else -1
        if votes == 0:
            dropped += 1
            continue
        c, r = (0, 1) if votes > 0 else (1, 0)
        out.append((ex, c, r))
    return out, dropped


def each_annotator_pairs(examples, margin_table: dict | None):
    """One (chosen, rejected, margin) per annotator label, as alignkit's ``rm.annotators: each`` trains.

    Ties are dropped (alignkit's default ``ties: drop``); golden labels count as one more labeller;
    the margin comes from the label's strength when the quickstart sets a margin table.
    """
    out = []
    for ex in examples:
        for lab in ex.labels:
            if lab.kind != "pairwise" or lab.tie:
                continue
            m = margin_table.get(lab.strength, 0.0) if margin_table and lab.strength else 0.0
            out.append((ex, lab.chosen, lab.rejected, m))
    return out


def run_rm(args, s: dict) -> dict:
    t0 = time.time()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignkit.tasks import gold_reward  # each prompt by its own task
    from alignkit.schema import load_examples

    from alignkit.losses import MARGIN_TABLES

    tok = AutoTokenizer.from_pretrained(args.sft)
    examples = load_examples(s["rm_files"], seed=args.seed)
    # The quickstart's own choice: every annotator's pair (with strength margins, which TRL's
    # RewardTrainer takes as a "margin" column), or one label per pair (majority vote; TRL has no
    # Dawid-Skene, so a TRL user would take the majority).
    table = MARGIN_TABLES.get(s.get("rm_margin", "none"))
    if s.get("rm_annotators") == "each":
        pairs, dropped, labels = each_annotator_pairs(examples, table), 0, "each annotator's pair"
        labels += f", margins {s['rm_margin']}" if table else ""
    else:
        pairs, dropped = majority_pairs(examples)
        pairs, labels = [(ex, c, r, 0.0) for ex, c, r in pairs], "majority vote per pair"
    rows = [{"chosen": prompt_text(tok, ex.messages) + " " + ex.answers[c],
             "rejected": prompt_text(tok, ex.messages) + " " + ex.answers[r], **({"margin": m} if table else {})}
            for ex, c, r, m in pairs]
    gold_agree = sum(gold_reward([ex.prompt], [ex.answers[c]])[0] > gold_reward([ex.prompt], [ex.answers[r]])[0]
                     for ex, c, r, _ in pairs) / max(1, len(pairs))
    # InstructGPT: the reward model starts from the SFT model (alignkit's quickstart does the same).
    model = AutoModelForSequenceClassification.from_pretrained(args.sft, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    cfg = RewardConfig(
        output_dir=args.out, num_train_epochs=s["rm_epochs"], per_device_train_batch_size=s["rm_batch"],
        learning_rate=s["rm_lr"], lr_scheduler_type=s["rm_scheduler"], warmup_steps=s["rm_warmup_ratio"],
        max_grad_norm=1.0, weight_decay=0.0, bf16=True, use_cpu=True, max_length=s["rm_max_length"],
        gradient_checkpointing=False, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed, dataloader_num_workers=0)
    budget = budget_callback(t0, args.budget)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[budget])
    planned = len(trainer.get_train_dataloader()) * s["rm_epochs"]
    trainer.train()
    trainer.save_model(args.out)
    tok.save_pretrained(args.out)
    return {"stage": "rm", "seconds": time.time() - t0, "steps": trainer.state.global_step, "planned_steps": planned,
            "epochs_done": trainer.state.global_step / max(1, planned) * s["rm_epochs"], "pairs": len(rows),
            "pairs_dropped_even_vote": dropped, "label_gold_agreement": gold_agree, "labels": labels,
            "settings": f"RewardTrainer, {labels}, bf16, no grad checkpointing"}


# ----------------------------------------------------------------------------- PPO (TRL 1.12)


def run_ppo(args, s: dict) -> dict:
    t0 = time.time()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit.schema import load_examples, prompts as prompt_view

    tok = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    encode = [{"input_ids": tok(prompt_text(tok, ex.messages), add_special_tokens=False)["input_ids"]}
              for ex in prompt_view(load_examples(s["ppo_files"], seed=args.seed))]
    held_out = [{"input_ids": tok(prompt_text(tok, ex.messages), add_special_tokens=False)["input_ids"]}
                for ex in prompt_view(load_examples(s["eval_files"], seed=args.seed))]
    policy = AutoModelForCausalLM.from_pretrained(args.sft, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.sft, dtype=torch.float32)
    # TRL's examples initialise the value model from the reward model, as InstructGPT does.
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, dtype=torch.float32)
    batch = s["rollout_batch"]
    cfg = PPOConfig(
        output_dir=args.out, use_cpu=True, seed=args.seed, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1,
        # The task's shape, equal to alignkit's quickstart: 64 prompts per update, 2 minibatches of 32
        # (gradient_accumulation_steps must stay 1: TRL 1.12 accumulates across minibatches otherwise),
        # 32-token responses sampled at temperature 1.0 (evaluation samples at 1.0 too), EOS stops.
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=s["num_minibatches"],
        local_rollout_forward_batch_size=batch, response_length=s["response_length"],
        temperature=s["temperature"], stop_token="eos",
        # As in TRL's own TL;DR PPO example (alignkit's quickstart uses the same -1 for a missing EOS).
        missing_eos_penalty=args.missing_eos_penalty,
        # TRL 1.12 defaults (RLHF.md): kl_coef 0.05, k1 (here: the config's ppo.kl_estimator, as alignkit), cliprange 0.2/0.2, vf_coef 0.1, gamma 1, lam 0.95,
        # 4 PPO epochs, no reward whitening; bf16 autocast (TRL's default).
        num_ppo_epochs=s["ppo_epochs"], kl_coef=args.kl_coef, kl_estimator=s.get("kl_estimator", "k1"), cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False, bf16=True,
        # Not TRL defaults: its 3e-6 is for pretrained billion-parameter models and does not move a
        # random-init tiny model in minutes; this is alignkit's quickstart rate, kept constant (as in
        # the quickstart) so the 1x snapshot of a 2x run equals a 1x run.
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=False,  # TRL's default True is slower; memory is no issue at this size
        num_sample_generations=0,  # no greedy sample printing inside the budget
        total_episodes=batch * 100000,  # the budget callback ends the run
    )
    result: dict = {"stage": "ppo", "settings": f"trl.experimental.ppo.PPOTrainer lr={args.lr} constant, kl_coef={args.kl_coef}, bf16, "
                                                f"stop_token=eos, missing_eos_penalty={args.missing_eos_penalty}"}
    trainer = None
    update_ends: list[float] = []

    def save(name: str):
        d = os.path.join(args.out, name)
        trainer.accelerator.unwrap_model(trainer.model).policy.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """1x: stop before the update that would end past the budget; then on to extend x the updates."""

        def on_step_end(self, a, state, control, **kw):
            now = time.time()
            last = now - (update_ends[-1] if update_ends else train_start)
            update_ends.append(now)
            if "updates_1x" not in result:
                if now - t0 + last > args.budget or (args.updates and state.global_step >= args.updates):
                    result["updates_1x"] = state.global_step
                    save("ppo_1x")
                    result["seconds"] = time.time() - t0  # loading + updates + saving, like alignkit's stage time
                    if args.extend <= 1:
                        raise BudgetReached
            elif state.global_step >= args.extend * result["updates_1x"]:
                save(f"ppo_{args.extend}x")
                result["updates_long"] = state.global_step
                result["seconds_long"] = time.time() - t0
                raise BudgetReached
            return control

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref_policy, reward_model=reward_model,
                         value_model=value_model, train_dataset=Dataset.from_list(encode),
                         eval_dataset=Dataset.from_list(held_out), callbacks=[Budget()])
    train_start = time.time()
    try:
        trainer.train()
    except BudgetReached:
        pass
    steps = [h for h in trainer.state.log_history if "objective/scores" in h]
    durations = [b - a for a, b in zip([train_start] + update_ends[:-1], update_ends)]
    n1 = result["updates_1x"]
    result.update({
        "seconds_per_update": sum(durations[:n1]) / max(1, n1),
        "startup_seconds": train_start - t0,
        "curve": [{k: h.get(k) for k in ("objective/scores", "objective/kl", "objective/rlhf_reward",
                                         "policy/entropy_avg", "val/num_eos_tokens")} for h in steps],
    })
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["sft", "rm", "ppo"], required=True)
    p.add_argument("--settings", required=True, help="JSON of the quickstart's hyperparameters (from the parent)")
    p.add_argument("--out", required=True)
    p.add_argument("--sft", help="TRL SFT output folder (rm, ppo)")
    p.add_argument("--rm", help="TRL reward model folder (ppo)")
    p.add_argument("--budget", type=float, required=True, help="seconds for this stage")
    p.add_argument("--extend", type=int, default=0, help="ppo: also train on to this many times the updates "
                   "(out/ppo_<K>x); 0: stop at the budget")
    p.add_argument("--updates", type=int, default=0, help="ppo: stop after this many updates (1x) even within "
                   "the budget; 0: the budget alone decides")
    p.add_argument("--lr", type=float, default=1e-3, help="ppo learning rate")
    p.add_argument("--kl-coef", type=float, default=0.05, help="ppo: fixed KL coefficient beta (TRL 1.12's default 0.05)")
    p.add_argument("--missing-eos-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = json.loads(args.settings)
    run = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo}[args.stage]
    result = run(args, settings)
    import resource

    import trl

    result["trl_version"] = trl.__version__
    result["torch_threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(result)


if __name__ == "__main__":
    main()
