"""Starting a multi-process stage under torchrun, before the stage's imports.

`python -m stages.search` imports the `stages` package first, and its `__init__` calls
`relaunch_under_torchrun`: when params.yaml asks for compute.nproc > 1, the process is replaced by torchrun
there, before torch, transformers and mlflow are imported (about 3 s on a small CPU) by a process that would
only exec. Nothing here imports torch."""
from __future__ import annotations

import os
import shutil
import sys

import yaml

LAUNCHER_PID = "DARWINLM_LAUNCHER_PID"  # the pid torchrun's agent will have (exec keeps it): workers die with it


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_path() -> str | None:
    """torchrun on PATH, or beside this Python (a venv not on PATH); None when it is missing."""
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return shutil.which("torchrun") or (beside if os.path.exists(beside) else None)


def relaunch_under_torchrun(modules: tuple[str, ...], params_file: str = "params.yaml") -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node N -m <module> <args>` when it runs one
    of `modules` with `python -m` and `params_file` sets compute.nproc = N > 1 (one node; for several nodes
    run torchrun yourself with --nnodes and a rendezvous endpoint). A params file that does not read as a
    number of processes leaves the process as it is: the stage's validation then names the problem."""
    argv = sys.orig_argv
    if launched_by_torchrun() or "-m" not in argv[:-1]:
        return
    module_and_args = argv[argv.index("-m") + 1:]
    if module_and_args[0] not in modules:
        return
    try:
        with open(params_file) as f:
            nproc = yaml.safe_load(f)["compute"]["nproc"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return
    torchrun = torchrun_path()
    if type(nproc) is int and nproc > 1 and torchrun:
        os.environ[LAUNCHER_PID] = str(os.getpid())
        os.execv(torchrun, [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", *module_and_args])
