"""PPO speed and memory: alignkit vs TRL 1.12 ``trl.experimental.ppo.PPOTrainer`` (the last TRL with PPO).

    /work/venv/bin/python benchmarks/bench_ppo.py                  # builtin:tiny SFT copy, 3 alternating repeats, ~5 min
    /work/venv/bin/python benchmarks/bench_ppo.py --config large --repeats 1   # ~46M-parameter Llama, ~6 min
    /work/venv/bin/python benchmarks/bench_ppo.py --modes alignkit-full,trl-full --repeats 1   # quick look
    /work/venv/bin/python benchmarks/bench_ppo.py --config large --modes alignkit-shared --repeats 1 \
        --alignkit-set model.gradient_checkpointing=true                                    # lowest-memory mode

TRL 1.12 runs from its own virtualenv (``--trl-python``, default /work/venv-trl112/bin/python:
torch 2.13 CPU, transformers 5.23, peft 0.21, trl 1.12.0); alignkit from this interpreter.
Every run is its own subprocess with 1 torch thread (``--threads``; OMP/MKL_NUM_THREADS in the
child's environment only), so its peak RSS (``os.wait4`` of that child) is its own. The modes
alternate within each repeat (a1 t1 ... a2 t2 ...), and medians over repeats are reported.

Same for both tools: the policy folder (``--config tiny``: builtin:tiny after a short alignkit SFT,
so responses end with EOS; ``large``: a randomly initialised Llama of ~46M parameters, whose
responses mostly run to the full length), the same chat-templated built-in prompt token ids, the reward
model (a sequence-classification Llama built from the policy folder, sharing its tokenizer), the
value model initialised from that reward model, rollout batch, micro-batch of the no-grad rollout
passes (= the rollout batch), response length, temperature, PPO epochs and minibatches (one
optimizer step per minibatch, no gradient accumulation), learning rate and linear schedule,
fixed KL coefficient 0.05 with the k1 estimator, clip ranges 0.2/0.2, vf_coef 0.1, gamma 1, lambda
0.95, no reward whitening, responses truncated after the first EOS, missing-EOS penalty 1.

Per tool: TRL at its own precision default (``bf16=True``: autocast on the training forwards;
generation and the reference/value/reward passes run unwrapped, in fp32). PPOTrainer never turns on
gradient checkpointing (its config default ``gradient_checkpointing=True`` is not applied by the PPO
loop), so both run without it. TRL LoRA: ``peft_config=LoraConfig(all-linear, r=16, alpha=32)``,
reference = adapter off, value model a full trainable copy (PPOTrainer has no value adapter).
alignkit modes: ``full`` (frozen reference copy), ``lora`` (reference = adapter off; value = reward-model
copy + LoRA), ``shared`` (``ppo.shared_base=true``: policy, reference, value and reward share one frozen
base; the reward model is handed over as a LoRA adapter of the policy folder, ``reward_adapter/``: the
reward folder's backbone is the policy's own weights and the adapter's B = 0, so its scores are exactly
the full reward model's; the value adapter starts as a copy of it). alignkit's precision is
``--alignkit-precision``.

Timing (benchmarks/common.py ``PPOUpdateClock``): an update spans from the last optimizer step of the
previous update to its own last one; update 1 (and ``--warmup`` more) is left out; the table shows
the median over timed updates, then the median over repeats. Phases: time inside ``generate``,
the rest of the rollout (log-probs, values, reward, GAE), and the PPO epochs (first gradient
forward to last optimizer step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PPOUpdateClock, current_rss_mb, emit, median_of, print_table, run_child  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

MODES = ("alignkit-full", "alignkit-lora", "alignkit-shared", "trl-full", "trl-lora")

# Each configuration: the model, and PPO shapes small enough for a shared 2-core CPU.
CONFIGS = {
    "tiny": dict(model=dict(size="tiny"), sft_steps=300, batch=64, minibatches=2, epochs=4, response_length=32,
                 updates=4),
    # ~46M parameters per model (184 MB in fp32), so weights and optimizer state, not the runtime or the
    # activations of a micro-batch of 4 x ~25 tokens, decide the memory. Untrained: responses run to full length.
    "large": dict(model=dict(size="small", hidden_size=768, intermediate_size=2304, num_hidden_layers=6,
                             num_attention_heads=12, num_key_value_heads=12),
                  sft_steps=0, batch=8, minibatches=2, epochs=4, response_length=16, updates=3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model and PPO shapes (see CONFIGS)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; medians are reported")
    p.add_argument("--updates", type=int, default=0, help="PPO updates per run (0: the config's)")
    p.add_argument("--warmup", type=int, default=1, help="first updates left out of the timing (update 1 always is)")
    p.add_argument("--batch", type=int, default=0, help="rollout batch (0: the config's)")
    p.add_argument("--response-length", type=int, default=0, help="(0: the config's)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (TRL 1.12's default)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--alignkit-precision", default="no", choices=["no", "bf16"],
                   help="alignkit's train.mixed_precision (TRL runs at its default, bf16)")
    p.add_argument("--alignkit-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra alignkit config override, e.g. model.gradient_checkpointing=true (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    p.add_argument("--trl-python", default="/work/venv-trl112/bin/python", help="interpreter of the TRL 1.12 venv")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "alignkit", "bench-ppo"),
                   help="where the prepared policy and reward model are kept between runs")
    p.add_argument("--workdir", default=None, help="logs and run outputs (default: a temp dir, removed)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over update 3 of each run, printed to its log (kept in --workdir)")
    # Internal: the parent starts one child per run with these.
    p.add_argument("--worker", choices=("prepare",) + MODES, help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--reward", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = CONFIGS[args.config]
    args.updates = args.updates or shape["updates"]
    args.batch = args.batch or shape["batch"]
    args.response_length = args.response_length or shape["response_length"]
    args.minibatches, args.epochs = shape["minibatches"], shape["epochs"]
    return args


# ----------------------------------------------------------------------------- preparation (alignkit venv)


def prepare(args) -> dict:
    """Policy and reward-model folders for --config, built once into --cache."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.builtin import ensure_model

    shape = CONFIGS[args.config]
    model_kw = dict(shape["model"])
    size = model_kw.pop("size")
    root = os.path.join(args.cache, args.config + "-" + "-".join(f"{k}{v}" for k, v in sorted(model_kw.items()))
                        + f"-sft{shape['sft_steps']}")
    policy_dir, reward_dir = os.path.join(root, "policy"), os.path.join(root, "reward")
    if not os.path.exists(os.path.join(policy_dir, "config.json")):
        tmp = tempfile.mkdtemp(prefix="bench-ppo-prep-")
        if shape["sft_steps"]:
            from alignkit.config import load_config
            from alignkit.sft import SFTConfig, train_sft

            base = ensure_model(f"builtin:{size}") if not model_kw else _save_built(size, model_kw, tmp)
            cfg = load_config(SFTConfig, data={
                "model": {"name_or_path": base}, "data": {"train_files": ["builtin:sft"], "eval_files": [],
                                                          "max_length": 128, "packing": True},
                "train": {"max_steps": shape["sft_steps"], "per_device_batch_size": 8, "learning_rate": 3e-3,
                          "warmup_ratio": 0.05, "mixed_precision": "bf16", "save_every": 0, "log_every": 50},
                "log": {"progress": False}, "output_dir": os.path.join(tmp, "sft")})
            train_sft(cfg)
            src = os.path.join(tmp, "sft", "final")
        else:
            src = _save_built(size, model_kw, tmp)
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(policy_dir, ignore_errors=True)
        shutil.copytree(src, policy_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(reward_dir, "config.json")):
        # A reward model of the policy's architecture and tokenizer (its head seeded at random): for
        # speed and memory only its shape matters, and both tools get the very same one.
        torch.manual_seed(1)
        rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        rm.config.pad_token_id = rm.config.pad_token_id if rm.config.pad_token_id is not None else 0
        rm.save_pretrained(reward_dir)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(policy_dir).save_pretrained(reward_dir)
    adapter_dir = os.path.join(root, "reward_adapter")
    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        # The same reward model as a LoRA adapter of the policy folder, for alignkit's shared-base mode (its
        # reward model is an adapter on the policy's base): the reward folder's backbone IS the policy's
        # weights, and a fresh LoRA adds exactly 0 (B = 0), so it gives the very same scores.
        from peft import LoraConfig, TaskType, get_peft_model

        rm = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1)
        peft_rm = get_peft_model(rm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type=TaskType.SEQ_CLS, modules_to_save=["score"]))
        peft_rm.peft_config["default"].base_model_name_or_path = policy_dir
        peft_rm.save_pretrained(adapter_dir, safe_serialization=True)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(policy_dir).save_pretrained(adapter_dir)
    n_params = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(reward_dir).parameters())
    return {"policy": policy_dir, "reward": reward_dir, "reward_adapter": adapter_dir, "parameters": n_params}


def _save_built(size, overrides, tmp) -> str:
    model, tok = build_model_args(size, overrides)
    path = os.path.join(tmp, "built")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_model_args(size, overrides):
    from alignkit.builtin import build_model

    return build_model(size, **overrides)


# ----------------------------------------------------------------------------- children


def child_start(args):
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)


def profile_one_update(args) -> None:
    """--profile: torch.profiler over update 3 (from the end of update 2 to the end of update 3), printed to the log."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    S, state = args.epochs * args.minibatches, {"n": 0, "prof": None}

    def hook(opt, a, kw):
        state["n"] += 1
        if state["n"] == 2 * S:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
        elif state["n"] == 3 * S and state["prof"] is not None:
            prof = state["prof"]
            prof.__exit__(None, None, None)
            print(f"PROFILE {args.worker} update 3 (self CPU time by op)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))

    register_optimizer_step_post_hook(hook)


def late(modules: set) -> list[str]:
    """Top-level packages first imported after import_rss was taken (should be none of weight)."""
    return sorted({m.split(".")[0] for m in sys.modules} - {m.split(".")[0] for m in modules})


def alignkit_worker(args) -> dict:
    child_start(args)
    # Everything the run imports, imported up front, so that import_rss is the runtime without any model.
    import matplotlib
    import peft  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (plot_metrics draws curves.png at the end)
    from transformers.models.llama import modeling_llama  # noqa: F401

    from alignkit.config import load_config
    from alignkit.ppo import PPOConfig, train_ppo

    import_rss, modules = current_rss_mb(), set(sys.modules)
    mode = args.worker.split("-", 1)[1]
    clock = PPOUpdateClock(args.epochs * args.minibatches)
    clock.install()
    if args.profile:
        profile_one_update(args)
    lora = {"enabled": mode in ("lora", "shared"), "r": 16, "alpha": 32, "dropout": 0.0}
    cfg = load_config(PPOConfig, data={
        "model": {"name_or_path": args.policy, "lora": lora},
        "data": {"train_files": ["builtin:prompts"], "eval_files": [], "max_length": 64},
        "train": {"max_steps": args.updates, "per_device_batch_size": args.batch, "learning_rate": args.learning_rate,
                  "warmup_ratio": 0.0, "lr_scheduler": "linear", "max_grad_norm": 1.0,
                  "mixed_precision": args.alignkit_precision, "save_every": 0, "eval_every": 0, "log_every": 1,
                  "seed": 0},
        "log": {"progress": False},
        "ppo": {"rollout_batch_size": args.batch, "num_minibatches": args.minibatches, "ppo_epochs": args.epochs,
                "response_length": args.response_length, "temperature": args.temperature, "kl_coef": 0.05,
                "adaptive_kl": False, "kl_estimator": "k1", "clip_range": 0.2, "clip_range_value": 0.2,
                "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "whiten_rewards": False, "missing_eos_penalty": -1.0,
                "value_init": "reward", "shared_base": mode == "shared", "eval_samples": 0},
        "reward": {"sources": [{"name_or_path": args.reward}], "batch_size": args.batch},
        "output_dir": args.out}, overrides=args.alignkit_set)
    summary = train_ppo(cfg)
    rows = [json.loads(x) for x in open(os.path.join(args.out, "metrics.jsonl"), encoding="utf-8")]
    rows = [r for r in rows if "rollout/eos_share" in r]
    return {"updates": clock.updates(args.warmup), "import_rss_mb": import_rss, "late_imports": late(modules),
            "train_width": statistics.mean(sh[-1] for sh in clock.train_shapes),
            "eos_share": statistics.mean(r["rollout/eos_share"] for r in rows),
            "response_length": statistics.mean(r["rollout/response_length"] for r in rows),
            "memory_mode": summary["memory_mode"], "trainable": summary["trainable_parameters"],
            "precision": args.alignkit_precision}


def trl_worker(args) -> dict:
    child_start(args)
    import datasets
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.llama import modeling_llama  # noqa: F401
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit.schema import load_examples, prompts
    from alignkit.tokenization import encode_prompt

    import_rss, modules = current_rss_mb(), set(sys.modules)

    clock = PPOUpdateClock(args.epochs * args.minibatches)
    clock.install()
    if args.profile:
        profile_one_update(args)
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    # The same chat-templated prompt ids alignkit samples from (alignkit caps prompts at 64 tokens; none is longer).
    ids = [encode_prompt(tok, ex.messages) for ex in prompts(load_examples(["builtin:prompts"], seed=0))]
    assert max(map(len, ids)) <= 64
    train = datasets.Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    peft_config = None
    if args.worker == "trl-lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    cfg = PPOConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=args.minibatches, num_ppo_epochs=args.epochs, total_episodes=args.batch * args.updates,
        local_rollout_forward_batch_size=args.batch, response_length=args.response_length,
        temperature=args.temperature, stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        num_sample_generations=0, save_strategy="no", report_to=[], logging_steps=1, seed=0, use_cpu=True,
        disable_tqdm=True)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=train, value_model=value, eval_dataset=train.select(range(8)),
                         peft_config=peft_config)
    precision = f"bf16={cfg.bf16}, accelerator mixed_precision={trainer.accelerator.mixed_precision}"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "val/num_eos_tokens" in h]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"updates": clock.updates(args.warmup), "import_rss_mb": import_rss, "late_imports": late(modules),
            "train_width": statistics.mean(sh[-1] for sh in clock.train_shapes),
            "eos_share": statistics.mean(h["val/num_eos_tokens"] for h in logs) / args.batch,
            "response_length": None, "memory_mode": args.worker.split("-", 1)[1], "trainable": trainable,
            "precision": precision}


# ----------------------------------------------------------------------------- parent


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "prepare":
            return emit(prepare(args))
        return emit(alignkit_worker(args) if args.worker.startswith("alignkit") else trl_worker(args))

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    if args.updates <= args.warmup:
        sys.exit(f"--updates={args.updates} must exceed --warmup={args.warmup} (update 1 is never timed)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-ppo-")
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    if args.threads > 0:  # only the children's environment: nothing is set for the machine
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    common = ["--config", args.config, "--updates", str(args.updates), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--response-length", str(args.response_length),
              "--temperature", str(args.temperature), "--learning-rate", str(args.learning_rate),
              "--alignkit-precision", args.alignkit_precision, "--threads", str(args.threads), "--cache", args.cache]
    if args.profile:
        common.append("--profile")
    for item in args.alignkit_set:
        common += ["--alignkit-set", item]
    prep = run_child([sys.executable, __file__, "--worker", "prepare"] + common, os.path.join(workdir, "prepare.log"),
                     env=env)
    print(f"policy {prep['policy']} ({prep['parameters'] / 1e6:.2f}M parameters per model), reward {prep['reward']}",
          file=sys.stderr)

    results: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            python = args.trl_python if mode.startswith("trl") else sys.executable
            out = os.path.join(workdir, f"{mode}-{rep}")
            reward = prep["reward_adapter" if mode == "alignkit-shared" else "reward"]
            r = run_child([python, __file__, "--worker", mode, "--policy", prep["policy"], "--reward", reward,
                           "--out", out] + common, out + ".log", env=env)
            r["median_update"] = {k: median_of(r["updates"], k) for k in r["updates"][0]}
            results[mode].append(r)
            print(f"  repeat {rep + 1} {mode:<16} {r['median_update']['seconds']:.3f} s/update "
                  f"({r['median_update']['cpu_seconds']:.3f} CPU s)  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB  (wall {r['wall_seconds']:.0f} s)", file=sys.stderr)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "prepared": prep, "results": results}, f, indent=1)
    report(args, prep, results)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def report(args, prep, results) -> None:
    def med(mode, key):
        return statistics.median(r["median_update"][key] for r in results[mode])

    def med_rss(mode, key="peak_rss_mb"):
        return statistics.median(r[key] for r in results[mode])

    ref = "trl-full" if results.get("trl-full") else None
    trl_time, trl_cpu = (med(ref, "seconds"), med(ref, "cpu_seconds")) if ref else (None, None)
    trl_peak = med_rss(ref) if ref else None
    trl_model = trl_peak - med_rss(ref, "import_rss_mb") if ref else None
    print(f"\nconfig {args.config}: {prep['parameters'] / 1e6:.2f}M parameters per model; rollout batch {args.batch}, "
          f"{args.minibatches} minibatches, {args.epochs} PPO epochs, response length {args.response_length}, "
          f"temperature {args.temperature}; {args.updates} updates per run (first {max(args.warmup, 1)} untimed); "
          f"{args.threads} thread(s); median of {args.repeats} alternating repeat(s)\n")
    rows = []
    for mode, runs in results.items():
        if not runs:
            continue
        s, c = med(mode, "seconds"), med(mode, "cpu_seconds")
        peak, imports = med_rss(mode), med_rss(mode, "import_rss_mb")
        rows.append([
            mode, f"{s:.3f}", f"{s / trl_time:.2f}" if ref else "-", f"{c:.3f}", f"{c / trl_cpu:.2f}" if ref else "-",
            f"{med(mode, 'generate'):.3f}", f"{med(mode, 'rollout_other'):.3f}", f"{med(mode, 'ppo_epochs'):.3f}",
            f"{peak:.0f}", f"{100 * peak / trl_peak:.0f}%" if ref else "-", f"{imports:.0f}", f"{peak - imports:.0f}",
            f"{100 * (peak - imports) / trl_model:.0f}%" if ref else "-",
            f"{statistics.mean(r['eos_share'] for r in runs):.2f}",
            " ".join(f"{r['median_update']['seconds']:.2f}" for r in runs)])
    print_table(rows, ["mode", "s/update", "/ TRL full", "CPU s/update", "/ TRL full", "generate", "rollout rest",
                       "PPO epochs", "peak RSS MB", "/ TRL full", "imports MB", "peak - imports MB", "/ TRL full",
                       "EOS share", "s/update per repeat"])
    print("\ns/update: wall seconds per PPO update (median over timed updates, then over repeats); CPU s/update: "
          "process CPU seconds of the same updates (1 thread: wall minus time lost to other load); generate / rollout "
          "rest / PPO epochs: wall seconds of each phase. peak RSS: the child's ru_maxrss (everything: Python, torch, "
          "libraries, models, optimizer state, activations); imports MB: RSS after importing everything the run "
          "imports, before any model; peak - imports: what the models, optimizer state and activations added.")
    for mode, runs in results.items():
        if runs:
            print(f"  {mode}: precision {runs[0]['precision']}; trainable parameters {runs[0]['trainable']}; "
                  f"packages first imported after the imports mark: {runs[0]['late_imports']}")


if __name__ == "__main__":
    main()
