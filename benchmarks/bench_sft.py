"""SFT throughput: alignkit vs TRL's SFTTrainer on the same model, data, max length, batch size and steps.

    /work/venv/bin/python benchmarks/bench_sft.py
    /work/venv/bin/python benchmarks/bench_sft.py --size small --steps 30 --batch-size 8 --max-length 128

Both tools train the built-in Llama (``builtin:tiny`` by default) on the same built-in
demonstrations, written once as a conversational prompt-completion JSONL that both
read. Each tool runs in its own subprocess (so peak RSS is its own) at its own best
settings:

* alignkit: ``train_sft`` with best-fit-decreasing packing into rows of ``max_length``
  (a block-diagonal 4D mask keeps packed examples apart), bf16 autocast (attention in fp32
  on CPU: engine.use_fp32_attention_on_cpu), loss on answer tokens only.
* TRL 1.16: ``SFTTrainer`` with ``packing=True`` (its default ``bfd`` strategy, which turns
  on padding-free batches: every row of the batch is flattened into one sequence with
  restarting ``position_ids``), ``bf16=True``, ``completion_only_loss=True`` and
  ``gradient_checkpointing=False`` (TRL's default is True, which is slower).

Each child gets 1 torch thread by default (``--threads``): on a shared 2-core machine two
threads per process oversubscribe the cores. Results and profiles: benchmarks/README.md.

Throughput is counted identically for both (see benchmarks/common.py): non-padding input
tokens of every training forward, over the optimizer steps after the warm-up, divided by
the wall time of those steps. After training, each child also checks that its packed
examples cannot see each other: the logits of a packed row must equal the logits of its
examples run one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ThroughputMeter, emit, print_table, run_child  # noqa: E402

# "trl" is TRL's recommended packing (bfd, padding-free); the other two are opt-in comparisons:
# "trl-wrapped" concatenates everything and cuts it into max_length blocks (attention mask of ones),
# "trl-nopack" pads each batch of single examples to its longest.
TOOLS = ("alignkit", "trl", "trl-wrapped", "trl-nopack")
DEFAULT_TOOLS = "alignkit,trl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="built-in model size")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per tool (warm-up included)")
    p.add_argument("--warmup", type=int, default=5, help="first optimizer steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8, help="rows (packed) per optimizer step")
    p.add_argument("--max-length", type=int, default=128, help="packed row length / longest example")
    p.add_argument("--examples", type=int, default=2000, help="built-in demonstrations written to the JSONL")
    p.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"], help="bf16 autocast for both tools")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each child (both the same; 0 = torch's default). On a shared 2-core CPU\n"
                        "two threads per process oversubscribe the cores and timings swing several-fold")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool, interleaved; the fastest is reported")
    p.add_argument("--tools", default=DEFAULT_TOOLS, help=f"comma-separated, from {','.join(TOOLS)}")
    p.add_argument("--workdir", default=None, help="where data, logs and outputs go (default: a temp dir)")
    # Internal: the parent starts one child per tool with these.
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared by both children


def warmup_ratio_steps(args) -> int:
    """LR warm-up steps, the same for both tools (alignkit takes a ratio and rounds up)."""
    return max(1, -(-args.steps * 5 // 100))


def packed_isolation_error(model_dir: str, trained, inputs: dict, seq_lens: list[int]) -> float:
    """Max |logit difference| between one packed row and its examples run alone (0 means isolated).

    ``inputs`` is the tool's own collated batch of that single packed row; each example is
    then run by itself with positions 0..n-1 and no mask. The trained weights are copied into
    a freshly loaded fp32 sdpa model, because the trainers patch ``forward`` with bf16 autocast
    (whose rounding would hide a real leak behind ~1e-2 noise).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.load_state_dict(trained.state_dict())
    model.eval()
    # use_cache=False as in training (both trainers do it): with a KV cache transformers skips the
    # detection of packed sequences from restarting position_ids, and padding-free rows would leak.
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0].float()
        worst, start = 0.0, 0
        ids = inputs["input_ids"][0]
        for n in seq_lens:
            alone = model(input_ids=ids[start:start + n][None],
                          position_ids=torch.arange(n)[None], use_cache=False).logits[0].float()
            worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
            start += n
    return worst


def pad_token_id(model_dir: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).pad_token_id


# ----------------------------------------------------------------------------- alignkit child


def run_alignkit(args) -> dict:
    import alignkit.sft as sft
    from alignkit.config import DataConfig, LogConfig, ModelConfig, TrainConfig
    from alignkit.tokenization import collate_sft, encode_pairs, sft_rows

    meter = ThroughputMeter(pad_token_id(args.model))
    captured = {}
    load_model = sft.load_model

    def load_and_hook(*a, **kw):  # the model train_sft builds, hooked before accelerate wraps it
        model = load_model(*a, **kw)
        meter.attach(model)
        captured["model"] = model
        return model

    sft.load_model = load_and_hook
    cfg = sft.SFTConfig(
        model=ModelConfig(name_or_path=args.model),
        data=DataConfig(train_files=[args.data], eval_files=[], max_length=args.max_length, truncation="truncate",
                        packing=True),
        train=TrainConfig(max_steps=args.steps, per_device_batch_size=args.batch_size, learning_rate=args.learning_rate,
                          warmup_ratio=warmup_ratio_steps(args) / args.steps, lr_scheduler="cosine",
                          max_grad_norm=1.0, mixed_precision=args.mixed_precision, log_every=10),
        log=LogConfig(progress=False),
        output_dir=args.out,
    )
    meter.start()
    summary = sft.train_sft(cfg)
    meter.stop()

    # Isolation check on the first packed row alignkit builds, with its own collate (4D block mask).
    tok = sft.load_tokenizer(cfg.model)
    train_rows, _, _ = sft.prepare_sft_data(cfg, tok)
    row = max(train_rows[:50], key=lambda r: len(r["seq_lens"]))
    batch = collate_sft([row], tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
    return {"tool": "alignkit", **meter.summary(args.warmup), "final_loss": summary["train_loss"],
            "isolation_error": packed_isolation_error(args.model, captured["model"], inputs, row["seq_lens"]),
            "settings": f"packing=bfd rows + 4D block mask, mixed_precision={args.mixed_precision}, "
                        "loss on answer tokens"}


# ----------------------------------------------------------------------------- TRL child


def run_trl(args) -> dict:
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32", attn_implementation="sdpa")
    meter = ThroughputMeter(tok.pad_token_id)
    meter.attach(model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=warmup_ratio_steps(args), weight_decay=0.0, max_grad_norm=1.0,
        bf16=args.mixed_precision == "bf16", use_cpu=True, max_length=args.max_length,
        packing=args.worker != "trl-nopack", packing_strategy="wrapped" if args.worker == "trl-wrapped" else "bfd",
        completion_only_loss=True,
        # TRL turns activation checkpointing on by default (memory over speed); alignkit does not.
        gradient_checkpointing=False,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    meter.start()
    trainer.train()
    meter.stop()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # Isolation check on a packed row as TRL collates it (padding-free: no attention mask, restarting positions).
    # ("wrapped" keeps no example boundaries and "nopack" has nothing packed: no check there.)
    isolation = None
    if config.packing and config.packing_strategy == "bfd":
        ds = trainer.train_dataset
        i = max(range(min(50, len(ds))), key=lambda j: len(ds[j]["seq_lengths"]))
        batch = trainer.data_collator([ds[i]])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        isolation = packed_isolation_error(args.model, trainer.model, inputs, list(ds[i]["seq_lengths"]))
    packing = f"packing=True strategy={config.packing_strategy}" if config.packing else "packing=False"
    if trainer.padding_free:
        packing += " (=> padding_free)"
    return {"tool": args.worker, **meter.summary(args.warmup), "final_loss": losses[-1] if losses else None,
            "isolation_error": isolation,
            "settings": f"trl {trl.__version__}: {packing}, bf16={config.bf16}, completion_only_loss=True, "
                        "gradient_checkpointing=False"}


# ----------------------------------------------------------------------------- parent


def isolated(error) -> str:
    if error is None:
        return "n/a"
    return f"yes ({error:.0e})" if error < 1e-3 else f"NO ({error:.2g})"


def write_data(path: str, n: int) -> dict:
    """Built-in demonstrations as conversational prompt-completion rows (TRL's format; alignkit reads it too)."""
    from alignkit.builtin import make_examples

    with open(path, "w", encoding="utf-8") as f:
        for ex in make_examples("sft", n, seed=0):
            f.write(json.dumps({"prompt": ex.messages,
                                "completion": [{"role": "assistant", "content": ex.answers[0]}]}) + "\n")
    return {"examples": n}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_alignkit(args) if args.worker == "alignkit" else run_trl(args))
        return
    unknown = [t for t in args.tools.split(",") if t not in TOOLS]
    if unknown:
        raise SystemExit(f"--tools: unknown {unknown}; choose from {','.join(TOOLS)}")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    from alignkit.builtin import SIZES, ensure_model

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_sft_")
    os.makedirs(workdir, exist_ok=True)
    model_dir = ensure_model(f"builtin:{args.size}")
    data = os.path.join(workdir, "sft.jsonl")
    write_data(data, args.examples)
    hidden, layers, heads, inter = SIZES[args.size]
    print(f"model builtin:{args.size} (hidden {hidden}, {layers} layers, {heads} heads, mlp {inter}) from {model_dir}")
    print(f"data {args.examples} built-in demonstrations -> {data}")
    print(f"max_length {args.max_length}, batch {args.batch_size} rows, {args.steps} steps "
          f"({args.warmup} warm-up steps not timed), lr {args.learning_rate}, "
          f"torch threads per run: {args.threads or 'default'}")

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {t: [] for t in args.tools.split(",")}
    for rep in range(args.repeats):  # interleaved, so a burst of other load hits both tools alike
        for tool in runs:
            out = os.path.join(workdir, f"{tool}-{rep}")
            argv_child = [sys.executable, os.path.abspath(__file__), "--worker", tool, "--data", data,
                          "--model", model_dir, "--out", out, "--size", args.size, "--steps", str(args.steps),
                          "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                          "--max-length", str(args.max_length), "--mixed-precision", args.mixed_precision,
                          "--learning-rate", str(args.learning_rate)]
            print(f"running {tool} (run {rep + 1}/{args.repeats}) ...", flush=True)
            env = dict(os.environ)
            if args.threads > 0:  # only the child's environment: nothing is set for the machine
                env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            r = run_child(argv_child, out + ".log", env=env)
            runs[tool].append(r)
            print(f"  {r['tokens_per_second']:.0f} tokens/s; {r['settings']}", flush=True)
    # The fastest run of each tool is the one least disturbed by other processes on the machine.
    results = {t: max(rs, key=lambda r: r["tokens_per_second"]) for t, rs in runs.items()}

    rows = []
    for tool, r in results.items():
        rows.append([tool, f"{r['tokens_per_second']:.0f}", f"{r['median_step_tokens_per_second']:.0f}",
                     f"{r['tokens_per_cpu_second']:.0f}",
                     f"{r['tokens_per_step']:.0f}", f"{r['seconds_per_step']:.3f}", r["timed_steps"],
                     f"{max(x['peak_rss_mb'] for x in runs[tool]):.0f}",
                     f"{r['final_loss']:.3f}" if r["final_loss"] else "-", isolated(r["isolation_error"]),
                     f"{r['wall_seconds']:.0f}"])
    print()
    print_table(rows, ["tool", "tokens/s", "tokens/s (median step)", "tokens/CPU-s", "tokens/step", "s/step", "timed steps", "peak RSS MB",
                       "last loss", "packed isolated", "wall s"])
    print()
    for other in [t for t in results if t.startswith("trl") and "alignkit" in results]:
        ratio = results["alignkit"]["tokens_per_second"] / results[other]["tokens_per_second"]
        med = results["alignkit"]["median_step_tokens_per_second"] / results[other]["median_step_tokens_per_second"]
        cpu_ratio = results["alignkit"]["tokens_per_cpu_second"] / results[other]["tokens_per_cpu_second"]
        target = f" (target >= 1.3x: {'met' if ratio >= 1.3 else 'NOT met'})" if other == "trl" else ""
        print(f"alignkit / {other}: {ratio:.2f}x tokens per second{target}; {med:.2f}x by median step, "
              f"{cpu_ratio:.2f}x tokens per CPU-second")
    print(f"load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
          " (other processes slow both tools; rerun with --repeats 3 when it is high)")
    print(f"logs and outputs in {workdir}")


if __name__ == "__main__":
    main()
