"""Processes on one machine: how alignkit points gloo at loopback, and how the test suite runs
multi-process launches so that a hang fails one test instead of stalling the suite."""

import os
import sys

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
