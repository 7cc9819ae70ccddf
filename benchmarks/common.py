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
