"""Processes on one machine: how alignkit points gloo at loopback, and how the test suite runs
multi-process launches so that a hang fails one test instead of stalling the suite."""

import os
import sys
import time

import pytest

from conftest import run_processes


def test_processes_on_one_machine_talk_over_loopback(monkeypatch):
    """gloo binds the address the host name resolves to, which a firewalled container may not reach:
    processes launched on one machine are pointed at loopback; several machines or a user's choice are kept."""
    import socket

    from alignkit.engine import use_loopback_for_gloo

    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo"), (2, "eth0")])
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines
    use_loopback_for_gloo()
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one machine
    use_loopback_for_gloo()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")  # the user's choice
    use_loopback_for_gloo()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth0"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process: no group to talk to
    use_loopback_for_gloo()
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def test_a_hung_launch_is_killed_retried_and_fails_the_test(tmp_path):
    marker = tmp_path / "started"
    hang = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); import time; time.sleep(120)"]
    with pytest.warns(UserWarning, match="did not finish in 1 s"):
        with pytest.raises(pytest.fail.Exception, match=r"attempt 2 of 2"):
            run_processes(hang, timeout=1)
    assert marker.read_text() == "xx"  # tried twice
    done = run_processes([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert done.returncode == 3 and done.stdout == "out\n"  # a run that ends is returned as it is


def test_a_hung_worker_in_its_own_session_is_killed_with_its_launcher(tmp_path):
    """torch's launcher starts each worker in a new session, out of reach of the group kill; a worker left
    holding the output pipes used to keep the timed-out test waiting forever (seen: a rank stuck in gloo's
    teardown). The run's environment marker reaches it: the test fails in bounded time, the worker is gone."""
    pidfile = tmp_path / "worker.pid"
    code = ("import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            f"start_new_session=True); open({str(pidfile)!r}, 'w').write(str(w.pid)); w.wait()")
    with pytest.raises(pytest.fail.Exception, match=r"did not finish in 2 s \(attempt 1 of 1\)"):
        run_processes([sys.executable, "-c", code], timeout=2, attempts=1)
    pid = int(pidfile.read_text())

    def state():
        try:
            with open(f"/proc/{pid}/status") as f:
                return next(line for line in f if line.startswith("State:")).split()[1]
        except FileNotFoundError:
            return "gone"

    deadline = time.time() + 20  # a killed process may show as running while it exits on a busy machine
    while state() not in ("gone", "Z") and time.time() < deadline:
        time.sleep(0.1)
    assert state() in ("gone", "Z")
