"""Shared helpers for alignkit's benchmarks: one subprocess per tool, per-tool peak memory, throughput, tables.

Imported by the benchmark scripts next to it, e.g.

    /work/venv/bin/python benchmarks/bench_sft.py

Each tool runs in its own child process so that its peak resident memory (``ru_maxrss``
from ``os.wait4`` of that very child) is its own and not the maximum over everything
run so far. The child prints one line ``BENCH_RESULT {json}`` that the parent parses.

Throughput is measured the same way for every tool, without trusting its own logs:
a forward pre-hook on the model counts the non-padding input tokens of every
training forward, and a global optimizer step post-hook stamps the time after
every optimizer step. Tokens per second is then (tokens processed after the
warm-up steps) / (time from the end of the last warm-up step to the end of the
last step): start-up, data preparation, warm-up and saving are all excluded.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "BENCH_RESULT "


# ----------------------------------------------------------------------------- parent side


def run_child(argv: list[str], log_path: str, env: dict | None = None) -> dict:
    """Run ``argv`` as a child process, return its BENCH_RESULT dict plus ``peak_rss_mb`` and ``wall_seconds``.

    The child's stdout and stderr go to ``log_path``; on failure its tail is raised.
    """
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the max over all children so far.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    with open(log_path, encoding="utf-8", errors="replace") as f:
        out = f.read()
    results = [line[len(RESULT_PREFIX):] for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        tail = "\n".join(out.splitlines()[-40:])
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(results[-1])
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    result["peak_rss_mb"] = usage.ru_maxrss * scale
    result["wall_seconds"] = wall
    return result


def print_table(rows: list[list], header: list[str]) -> None:
    """A plain fixed-width table (Markdown-compatible, so it can be pasted into a report)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


# ----------------------------------------------------------------------------- child side


class ThroughputMeter:
    """Counts non-padding input tokens per training forward and stamps the time after each optimizer step.

    ``attach(model)`` hooks the model that the trainer calls; ``start()`` installs the global
    optimizer hook (it sees the real torch optimizer inside any wrapper, e.g. accelerate's).
    Forwards run without gradients (evaluation, checks) are not counted.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.tokens = 0
        # (wall time, process CPU time, tokens so far) after each optimizer step
        self.marks: list[tuple[float, float, int]] = []
        self._handles = []

    def attach(self, model) -> None:
        import torch

        def count(module, args, kwargs):
            if module.training and torch.is_grad_enabled():
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.tokens += int((ids != self.pad_token_id).sum())

        self._handles.append(model.register_forward_pre_hook(count, with_kwargs=True))

    def start(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles.append(register_optimizer_step_post_hook(
            lambda opt, args, kwargs: self.marks.append((time.perf_counter(), time.process_time(), self.tokens))))

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self, warmup_steps: int) -> dict:
        """Tokens/s over optimizer steps warmup_steps+1 .. last (step 1 is always warm-up: nothing marks its start)."""
        w = max(warmup_steps, 1)
        if len(self.marks) <= w:
            raise RuntimeError(f"only {len(self.marks)} optimizer steps ran; need more than {w} warm-up steps")
        (t0, c0, n0), (t1, c1, n1) = self.marks[w - 1], self.marks[-1]
        steps = len(self.marks) - w
        return {"warmup_steps": w, "timed_steps": steps, "timed_tokens": n1 - n0, "timed_seconds": t1 - t0,
                "tokens_per_second": (n1 - n0) / (t1 - t0), "seconds_per_step": (t1 - t0) / steps,
                "tokens_per_step": (n1 - n0) / steps,
                # A burst of other load slows a few steps a lot; the median step time barely moves.
                "median_step_tokens_per_second": (n1 - n0) / steps / statistics.median(
                    b[0] - a[0] for a, b in zip(self.marks[w - 1:-1], self.marks[w:])),
                # CPU seconds of all the process's threads: less sensitive than wall time to other load.
                "tokens_per_cpu_second": (n1 - n0) / max(c1 - c0, 1e-9)}


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- PPO (bench_ppo.py)


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PPOUpdateClock:
    """Wall time of each PPO update, split into phases, measured the same way for any trainer.

    Three kinds of marks, none taken from the trainer's own logs:

    * the end of every optimizer step (a global torch optimizer step post-hook);
    * the start and end of every ``generate`` call (``GenerationMixin.generate`` wrapped);
    * every forward of the Llama backbone (``LlamaModel.forward`` wrapped) run with gradients on,
      i.e. the training forwards of the PPO epochs (all rollout passes run under no_grad).

    An update ends at its last optimizer step (``steps_per_update`` = PPO epochs x minibatches),
    so update k spans (end of update k-1, end of update k]. Inside it: ``generate`` = time in
    generate calls, ``ppo_epochs`` = from its first gradient forward to its end, and
    ``rollout_other`` = the rest (policy/reference log-probs, values, reward, GAE, bookkeeping).
    Update 1 has no start mark and is never timed. ``cpu_seconds`` is the process CPU time of the
    update: on a shared machine it moves much less than wall time when other jobs take the cores.
    """

    def __init__(self, steps_per_update: int):
        self.steps_per_update = steps_per_update
        self.steps: list[float] = []
        self.step_cpu: list[float] = []  # process CPU time at the same marks
        self.generations: list[tuple[float, float]] = []
        self.grad_forwards: list[tuple[float, float]] = []  # (wall, process CPU time)
        self.train_shapes: list[tuple[int, ...]] = []  # input_ids shape of every training forward
        self._handles = []

    def install(self) -> None:
        import functools

        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers.generation.utils import GenerationMixin
        from transformers.models.llama.modeling_llama import LlamaModel

        def mark(opt, args, kwargs):
            self.steps.append(time.perf_counter())
            self.step_cpu.append(time.process_time())

        self._handles.append(register_optimizer_step_post_hook(mark))
        generate, forward = GenerationMixin.generate, LlamaModel.forward

        @functools.wraps(generate)
        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                self.generations.append((t0, time.perf_counter()))

        @functools.wraps(forward)
        def marked_forward(*a, **kw):
            if torch.is_grad_enabled():
                self.grad_forwards.append((time.perf_counter(), time.process_time()))
                ids = kw.get("input_ids", a[1] if len(a) > 1 else None)
                if ids is not None:
                    self.train_shapes.append(tuple(ids.shape))
            return forward(*a, **kw)

        GenerationMixin.generate = timed_generate
        LlamaModel.forward = marked_forward

    def updates(self, warmup: int = 1) -> list[dict]:
        """Per timed update: seconds in total and per phase (updates 1..warmup are left out; at least update 1)."""
        S = self.steps_per_update
        ends = [self.steps[k * S - 1] for k in range(1, len(self.steps) // S + 1)]
        cpu = [self.step_cpu[k * S - 1] for k in range(1, len(self.steps) // S + 1)]
        rows = []
        for k in range(max(warmup, 1), len(ends)):  # ends[k] closes update k+1
            start, end = ends[k - 1], ends[k]
            gen = sum(b - a for a, b in self.generations if start < a < end)
            train_start, train_cpu = min(((t, c) for t, c in self.grad_forwards if start < t < end),
                                         default=(start, cpu[k - 1]))
            # CPU seconds of the whole process: with one thread, the wall time minus what other load took.
            rows.append({"update": k + 1, "seconds": end - start, "cpu_seconds": cpu[k] - cpu[k - 1], "generate": gen,
                         "rollout_other": train_start - start - gen, "ppo_epochs": end - train_start,
                         "ppo_epochs_cpu": cpu[k] - train_cpu, "rollout_cpu": train_cpu - cpu[k - 1]})
        return rows


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)
