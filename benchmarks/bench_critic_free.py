"""Critic-free RL (RLOO, GRPO) vs alignkit's own PPO at the same number of sampled responses.

    python benchmarks/bench_critic_free.py                      # builtin:tiny after a short SFT, gold reward, ~4 min
    python benchmarks/bench_critic_free.py --config large       # ~46M-parameter Llama: memory, ~5 min

One PPO loop (``alignkit.ppo.train_ppo``), three advantage estimators: ``gae`` (value model
initialised from the reward model, value loss), ``rloo`` and ``grpo`` (``ppo.samples_per_prompt``
= 4, no value model; GRPO with the k3 KL in the loss). Everything else is the same: policy folder,
reward, rollout batch (``--batch`` responses per update: batch / 4 prompts x 4 samples for RLOO/GRPO,
batch prompts x 1 for PPO), response length, PPO epochs and minibatches, learning rate, KL coefficient.

Each run is its own subprocess with 1 torch thread, so its peak RSS (``os.wait4``) is its own.
Reported: median wall and CPU seconds per update (update 1 left out; on a shared machine the CPU
seconds are the steadier measure), peak RSS, trainable parameters, and for
``--config tiny`` the held-out gold reward before and after (128 prompts, same sampling seed).
``tiny`` optimises the built-in gold reward (what the seeded gain tests do); ``large`` a randomly
initialised Llama whose reward model is a same-shape sequence classifier (benchmarks/bench_ppo.py's
``large``): there weights, gradients and optimizer states decide the memory, and the gold reward
of an untrained model means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, print_table, run_child  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

MODES = {"ppo": ["ppo.advantage=gae"],
         "rloo": ["ppo.advantage=rloo", "ppo.samples_per_prompt=4"],
         "grpo": ["ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.kl_in_loss=true", "ppo.kl_estimator=k3"]}
CONFIGS = {
    "tiny": dict(batch=32, updates=16, response_length=24, learning_rate=5e-4, eval_samples=128),
    "large": dict(batch=8, updates=3, response_length=16, learning_rate=1e-5, eval_samples=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "alignkit", "bench-critic-free"))
    p.add_argument("--workdir", default=None, help="logs and run outputs (default: a temp dir)")
    p.add_argument("--worker", choices=tuple(MODES), help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--reward", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args) -> tuple[str, str]:
    """(policy folder, reward source) for --config, built once into --cache."""
    if args.config == "large":
        from bench_ppo import prepare as prepare_large

        prep = prepare_large(argparse.Namespace(config="large", cache=args.cache))
        return prep["policy"], prep["reward"]
    sft_dir = os.path.join(args.cache, "tiny-sft")
    if not os.path.exists(os.path.join(sft_dir, "final", "config.json")):
        from alignkit.config import load_config
        from alignkit.sft import SFTConfig, train_sft

        # The recipe of tests/test_ppo_gain.py: a few seconds of SFT, so responses are mostly well formed.
        train_sft(load_config(SFTConfig, data={
            "data": {"train_files": ["builtin:sft:train:800"], "max_length": 64},
            "train": {"max_steps": 60, "per_device_batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.05,
                      "log_every": 20}, "log": {"progress": False}, "output_dir": sft_dir}))
    return os.path.join(sft_dir, "final"), "builtin:gold"


def worker(args) -> None:
    import torch

    from alignkit.config import load_config
    from alignkit.engine import read_metrics
    from alignkit.ppo import PPOConfig, train_ppo

    torch.set_num_threads(1)
    shape = CONFIGS[args.config]
    cfg = load_config(PPOConfig, data={
        "model": {"name_or_path": args.policy},
        "data": {"train_files": ["builtin:prompts:train:256"],
                 "eval_files": ["builtin:prompts:eval"] if shape["eval_samples"] else [], "max_length": 32},
        "train": {"max_steps": shape["updates"], "per_device_batch_size": shape["batch"],
                  "learning_rate": shape["learning_rate"], "warmup_ratio": 0.0, "lr_scheduler": "constant",
                  "log_every": 1, "seed": 0, "save_every": 0, "num_threads": 1},
        "log": {"progress": False},
        "ppo": {"rollout_batch_size": shape["batch"], "num_minibatches": 2, "ppo_epochs": 4,
                "response_length": shape["response_length"], "eval_samples": shape["eval_samples"],
                "kl_target": 6.0},
        "reward": {"sources": [{"name_or_path": args.reward}]},
        "output_dir": args.out}, overrides=MODES[args.worker])
    summary = train_ppo(cfg)
    rows = read_metrics(args.out)
    seconds = [r["time/update_seconds"] for r in rows if "time/update_seconds" in r][1:]
    cpu = [r["time/update_cpu_seconds"] for r in rows if "time/update_cpu_seconds" in r][1:]
    result = {"mode": args.worker, "seconds_per_update": statistics.median(seconds) if seconds else None,
              "cpu_seconds_per_update": statistics.median(cpu) if cpu else None,
              "trainable": summary["trainable_parameters"], "updates": summary["updates"]}
    if summary["eval_after"]:
        result["gold_before"] = summary["eval_before"]["eval/gold_reward"]
        result["gold_std_before"] = summary["eval_before"]["eval/gold_reward_std"]
        result["gold_after"] = summary["eval_after"]["eval/gold_reward"]
        result["kl_after"] = summary["eval_after"]["eval/kl"]
    emit(result)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    policy, reward = prepare(args)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-critic-free-")
    os.makedirs(work, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        out = os.path.join(work, mode)
        argv = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--worker", mode,
                "--policy", policy, "--reward", reward, "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        r = run_child(argv, os.path.join(work, f"{mode}.log"), env)
        results.append(r)
        print(json.dumps(r), flush=True)
    ppo = next((r for r in results if r["mode"] == "ppo"), None)
    rows = []
    for r in results:
        row = [r["mode"], f"{r['seconds_per_update']:.2f}", f"{r['cpu_seconds_per_update']:.2f}",
               f"{r['peak_rss_mb']:.0f}",
               f"{r['peak_rss_mb'] / ppo['peak_rss_mb']:.2f}x" if ppo else "",
               f"{r['trainable']['policy'] + r['trainable']['value']:,}"]
        if "gold_after" in r:
            gain = (r["gold_after"] - r["gold_before"]) / r["gold_std_before"]
            row.append(f"{r['gold_before']:+.2f} -> {r['gold_after']:+.2f} ({gain:+.2f} std), KL {r['kl_after']:.2f}")
        rows.append(row)
    header = ["mode", "s/update", "CPU s/update", "peak RSS MB", "vs PPO", "trainable params"]
    if any("gold_after" in r for r in results):
        header.append("held-out gold (gain in SFT std)")
    print_table(rows, header)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
