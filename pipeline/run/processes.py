"""A run's processes live and die together, and one workspace has one live run.

- `die_with_launcher`: each torchrun worker asks the kernel to SIGKILL it when its parent, torchrun's agent,
  dies (Linux `PR_SET_PDEATHSIG`). torchrun starts workers in sessions of their own, so a kill of the
  launcher's process group (an OOM killer, a scheduler, a CI time limit, `kill -9` on `dvc repro`) would
  otherwise leave them running, searching on and writing checkpoints beside the next run. SIGKILL, not
  SIGTERM: a worker blocked in a collective whose peer is gone does not run Python signal handlers, and
  every checkpoint is written by renaming a finished file, so nothing half-written survives.
- `claim_workspace`: a stage records its processes in `.darwinlm/run.lock`; a stage that finds live processes
  of another run there (a platform without parent-death signals, a launcher that hangs) stops before any
  work and names them. A lock whose processes are gone is taken over without asking.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

import psutil

from pipeline.errors import UserError
from pipeline.run.launch import LAUNCHER_PID
from pipeline.run.outputs import write_text

LOCK = Path(".darwinlm/run.lock")
_PR_SET_PDEATHSIG = 1


class WorkspaceBusy(UserError):
    """Another run's processes are still at work in this workspace."""


def die_with_launcher() -> None:
    """Under torchrun on Linux: be killed when the agent that started this worker dies, and exit at once if
    it is already gone."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if os.getppid() != int(launcher):  # the launcher died before the signal was armed
        os._exit(1)


def run_pids(rank_pids: list[int]) -> list[int]:
    """This run's processes: every rank, and torchrun's agent when there is one."""
    launcher = os.environ.get(LAUNCHER_PID)
    return sorted({*rank_pids, *([int(launcher)] if launcher else [])})


def live_foreign(pids: list[int], ours: list[int], workspace: Path) -> list[int]:
    """Those of `pids` that are alive, are not ours, and work in `workspace` (a recycled pid elsewhere is not)."""
    alive = []
    for pid in pids:
        if pid in ours:
            continue
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and Path(process.cwd()) == workspace:
                alive.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return alive


def claim_workspace(stage: str, ours: list[int], lock: Path = LOCK) -> None:
    """Record `ours` as the workspace's live run, or raise WorkspaceBusy naming another run's live processes."""
    workspace = Path.cwd().resolve()
    if lock.is_file():
        try:
            held = json.loads(lock.read_text())
        except (OSError, ValueError):
            held = {}
        busy = live_foreign(held.get("pids", []), ours, workspace)
        if busy:
            raise WorkspaceBusy(
                f"processes {', '.join(map(str, busy))} of another run (stage {held.get('stage')}) are still working "
                f"in {workspace}; running beside them would mix two runs' checkpoints and outputs. Wait for them or "
                f"stop them (kill {' '.join(map(str, busy))}), then run again")
    write_text(lock, json.dumps({"stage": stage, "pids": ours}))


def release_workspace(ours: list[int], lock: Path = LOCK) -> None:
    """Remove the lock if it is still ours."""
    try:
        if json.loads(lock.read_text()).get("pids") == ours:
            lock.unlink()
            lock.parent.rmdir()  # only when empty: a stage leaves no folder it did not need
    except (OSError, ValueError):
        pass
