"""Peak memory per process of a PPO update, sharded (FSDP2, alignkit.sharding) vs not.

    python benchmarks/bench_sharding.py                       # 1 unsharded process, then 2 sharded
    python benchmarks/bench_sharding.py --layers 12 --width 512 --runs none:1,fsdp2:2,fsdp2:1

A ~50M-parameter Llama (random weights) as policy, value model (backbone + head) and frozen
reference, each sharded right after it is built when sharding is on. Each update: a rollout
generated with the policy's weights gathered (``engine.gathered``), reference log-probs, then one
PPO step (clipped policy loss + value loss, ``alignkit.losses``) through ``engine.optimizer_step``.
Every process reports its peak RSS (``ru_maxrss``) and the RSS growth while ``generate`` ran
(``BENCH_PHASES=1`` also prints RSS after each phase).
Runs on CPU with gloo (``torch.distributed.run``); results in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit import engine
    from alignkit.config import LogConfig, TrainConfig
    from alignkit.losses import logprobs_from_logits, policy_loss, value_loss

    torch.set_num_threads(1)
    train = TrainConfig(sharding=args.sharding, learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler="constant",
                        mixed_precision=args.precision)
    accelerator = engine.make_accelerator(train, LogConfig(), tempfile.mkdtemp())
    cfg = LlamaConfig(vocab_size=8192, hidden_size=args.width, intermediate_size=4 * args.width,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=256, tie_word_embeddings=True)

    class Value(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = LlamaForCausalLM(cfg).model
            self.head = torch.nn.Linear(cfg.hidden_size, 1)

        def forward(self, input_ids):
            return self.head(self.backbone(input_ids=input_ids).last_hidden_state)[..., 0]

    def build(make):
        torch.manual_seed(0)
        return engine.shard(make(), accelerator, train)

    phases = {"start": rss_mb()}
    policy = build(lambda: LlamaForCausalLM(cfg))
    phases["policy built"] = rss_mb()
    n_params = sum(p.numel() for p in policy.parameters())
    value = build(Value)
    reference = build(lambda: LlamaForCausalLM(cfg).requires_grad_(False).eval())
    phases["models built"] = rss_mb()
    params = [(n, p) for m in (policy, value) for n, p in m.named_parameters()]
    opt, sched = engine.make_optimizer(None, train, 100, params=params)
    g = torch.Generator().manual_seed(accelerator.process_index)
    generate_growth = []
    context, batch = 16, args.batch // accelerator.num_processes  # the same global batch for any process count
    for _ in range(args.updates):
        queries = torch.randint(3, cfg.vocab_size, (batch, context), generator=g)
        # 1. rollout with the policy's full weights gathered
        before = rss_mb()
        with torch.no_grad(), engine.gathered(policy):
            ids = policy.generate(queries, attention_mask=torch.ones_like(queries), max_new_tokens=args.response,
                                  do_sample=True, pad_token_id=0, eos_token_id=None)
            generate_growth.append(rss_mb() - before)
        # 2. reference log-probs, old log-probs and values
        with torch.no_grad():
            ref_lp = logprobs_from_logits(reference(input_ids=ids).logits[:, context - 1:-1], ids[:, context:])
            old_lp = logprobs_from_logits(policy(input_ids=ids).logits[:, context - 1:-1], ids[:, context:])
            old_values = value(ids)[:, context - 1:-1]
        advantages = (ref_lp - old_lp) + torch.randn(old_lp.shape, generator=g)
        mask = torch.ones_like(old_lp)
        # 3. one PPO step on the whole rollout
        lp = logprobs_from_logits(policy(input_ids=ids).logits[:, context - 1:-1], ids[:, context:])
        pg, _, _ = policy_loss(lp, old_lp, advantages, mask, 0.2)
        vf, _ = value_loss(value(ids)[:, context - 1:-1], old_values, old_values + advantages, mask, 0.2)
        phases["forward done"] = rss_mb()
        (pg + 0.1 * vf).backward()
        phases["backward done"] = rss_mb()
        engine.optimizer_step(accelerator, [p for _, p in params], opt, sched, 1.0)
        phases["step done"] = rss_mb()
    if os.environ.get("BENCH_PHASES"):
        print(accelerator.process_index, {k: round(v) for k, v in phases.items()}, flush=True)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, max(generate_growth)])
    peaks = accelerator.gather(peak.unsqueeze(0))
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump({"parameters_per_model": n_params, "peak_rss_mb": peaks[:, 0].tolist(),
                       "generate_rss_growth_mb": peaks[:, 1].tolist()}, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="global rollout batch")
    p.add_argument("--response", type=int, default=32)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--runs", default="none:1,fsdp2:2", help="sharding:processes, comma-separated")
    p.add_argument("--malloc-default", action="store_true", help="keep glibc's default mmap threshold")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sharding", default="none", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    if not args.malloc_default:
        # Buffers over 64 KB are mmapped and go back to the OS when freed, so RSS tracks live memory.
        # With glibc's default, the all-gather buffers FSDP frees after every layer stay in the heap
        # and the high-water mark counts them (see benchmarks/README.md).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    print("| sharding | processes | parameters per model | peak RSS per process (MB) | RSS growth in generate (MB) |")
    print("|---|---|---|---|---|")
    for run in args.runs.split(","):
        sharding, n = run.split(":")
        out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", str(29500 + os.getpid() % 1000),
               os.path.abspath(__file__), "--worker", "--sharding", sharding, "--out", out,
               *[f"--{k}={getattr(args, k)}" for k in ("layers", "width", "batch", "response", "updates", "precision")]]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.load(open(out))
        if os.environ.get("BENCH_PHASES"):
            print(r.stdout.strip(), flush=True)
        print(f"| {sharding} | {n} | {res['parameters_per_model'] / 1e6:.1f}M | "
              f"{', '.join(f'{x:,.0f}' for x in res['peak_rss_mb'])} | "
              f"{', '.join(f'{x:,.0f}' for x in res['generate_rss_growth_mb'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
