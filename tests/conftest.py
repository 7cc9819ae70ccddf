import json
import os
import signal
import socket
import subprocess
import sys
import uuid
import warnings

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_MARKER = "ALIGNKIT_TEST_RUN"


if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: one worker per core, so one torch thread per worker
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    """Long tests (marked slow; longest first where the mark says `seconds=`) before the others: under
    pytest-xdist the short ones then fill in around them, instead of one long test finishing alone at the end."""
    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0))

    items.sort(key=order)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(cmd, timeout=300, env=None, attempts=2):
    """Run a command that may start several processes (`accelerate launch`, a CLI run) in its own
    process group. `accelerate launch` gets a free port, so tests never meet another job's
    rendezvous. Past `timeout` seconds the whole group is killed; a hang is tried once more (on a
    new port) with a warning carrying the hung run's output, and a second hang fails the test with
    it: a hang costs one test, never the whole suite. A run that ends, passing or failing, is
    returned as it is."""
    cmd = [str(c) for c in cmd]
    env = {**(env or {}), **_cpu_if_too_few_gpus(cmd)}
    for attempt in range(1, attempts + 1):
        run = cmd
        if len(cmd) > 1 and os.path.basename(cmd[0]) == "accelerate" and cmd[1] == "launch":
            run = [cmd[0], "launch", "--main_process_port", str(free_port()), *cmd[2:]]
        # torch's launcher starts each worker in its own session: the group kill does not reach them, but the
        # environment marker does (each process of this run inherits it).
        marker = {RUN_MARKER: uuid.uuid4().hex}
        proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, **env, **marker})
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(run, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            _kill_run(proc.pid, marker)
            try:  # a worker still holding the pipes would make a plain communicate() wait forever
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                out, err = "", "(no output: the pipes stayed open after the kill)"
            report = (f"{' '.join(run[:6])} ... did not finish in {timeout} s (attempt {attempt} of {attempts})\n"
                      f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")
            if attempt == attempts:
                pytest.fail(report)
            print(report, file=sys.__stderr__, flush=True)  # in the CI log even when warnings are off
            warnings.warn(report)
        finally:
            _kill_run(proc.pid, marker)  # workers a crashed launcher left behind


def _cpu_if_too_few_gpus(cmd) -> dict:
    """Run N processes on CPU (gloo) where there are fewer than N GPUs: these tests check what several
    processes compute, and N NCCL ranks cannot share one GPU."""
    wanted = 1
    for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node"):
        if flag in cmd[:-1]:
            wanted = int(cmd[cmd.index(flag) + 1])
    return on_cpu_if_fewer_gpus_than(wanted) if wanted > 1 else {}


def on_cpu_if_fewer_gpus_than(n: int) -> dict:
    """The environment that hides the GPUs when there are fewer than ``n``: a one-process reference run
    that a test compares with an n-process one takes it too, so both run on the same device."""
    import torch

    return {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.device_count() < n else {}


def _kill_run(pgid, marker: dict) -> None:
    """Kill the launcher's process group and every process carrying this run's environment marker."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    (key, value), = marker.items()
    tag = f"{key}={value}".encode()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone already, not ours to read, or not a process folder


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from alignkit.builtin import ensure_model

    return ensure_model("builtin:tiny")


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    """A quickly fine-tuned built-in model (shared by later-stage tests)."""
    from alignkit.config import load_config
    from alignkit.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(SFTConfig, os.path.join(ROOT, "configs/sft/tiny.yaml"),
                      [f"output_dir={out}", "train.num_epochs=2", "train.save_every=0", "train.eval_every=0",
                       "log.progress=false"])
    train_sft(cfg)
    return str(out / "final")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Tiny random-weight models of eight real families (tests/families.py), built once per test session."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import families

    return families.build_all(str(tmp_path_factory.mktemp("families")))
