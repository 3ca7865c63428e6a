"""A run's processes die with their launcher, and a workspace refuses a second live run (pipeline/run/processes.py),
with real processes: a launcher killed by SIGKILL takes its workers (in sessions of their own, as torchrun starts
them) with it; a lock held by live processes in this workspace stops a stage, a stale one is taken over."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import ROOT

from pipeline.run.processes import WorkspaceBusy, claim_workspace, release_workspace

LAUNCHER = """
import os, subprocess, sys
env = dict(os.environ, DARWINLM_LAUNCHER_PID=str(os.getpid()))
code = "from pipeline.run.processes import die_with_launcher; die_with_launcher(); import time; time.sleep(60)"
workers = [subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True) for _ in range(2)]
print(" ".join(str(w.pid) for w in workers), flush=True)
import time; time.sleep(60)
"""


def _gone_within(pids, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_workers_die_with_a_killed_launcher():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers = [int(p) for p in launcher.stdout.readline().split()]
    try:
        time.sleep(1.5)  # the workers have imported and armed the signal
        assert all(psutil.pid_exists(p) for p in workers)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _gone_within(workers, 5), "workers outlived their launcher"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_live_run_in_the_workspace_stops_a_stage_and_a_stale_lock_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / ".darwinlm" / "run.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path)
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=ROOT)
    try:
        lock.parent.mkdir()
        lock.write_text(json.dumps({"stage": "search", "pids": [other.pid, elsewhere.pid]}))
        with pytest.raises(WorkspaceBusy, match=f"processes {other.pid} of another run \\(stage search\\)"):
            claim_workspace("search", [os.getpid()], lock)
        assert json.loads(lock.read_text())["pids"] == [other.pid, elsewhere.pid]  # not ours to take
    finally:
        other.kill()
        other.wait()
    claim_workspace("search", [os.getpid()], lock)  # its processes are gone (the other pid works elsewhere)
    assert json.loads(lock.read_text()) == {"stage": "search", "pids": [os.getpid()]}
    release_workspace([os.getpid()], lock)
    assert not lock.exists()
    elsewhere.kill()
