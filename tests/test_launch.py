"""When a stage process replaces itself by torchrun, and with which command line."""
import sys

import pytest
import yaml

from pipeline.run import launch

STAGES = ("stages.search", "stages.finetune")


@pytest.fixture
def execs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.setattr(launch, "torchrun_path", lambda: "/bin/torchrun")
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return calls


def _params(nproc):
    with open("params.yaml", "w") as f:
        yaml.safe_dump({"compute": {"nproc": nproc}}, f)


def _argv(monkeypatch, *argv):
    monkeypatch.setattr(sys, "orig_argv", list(argv))


def test_a_multiprocess_stage_becomes_torchrun_with_its_arguments(execs, monkeypatch):
    _params(2)
    _argv(monkeypatch, "python", "-X", "importtime", "-m", "stages.finetune", "searched")
    launch.relaunch_under_torchrun(STAGES)
    assert execs == [["/bin/torchrun", "--standalone", "--nproc-per-node=2", "-m", "stages.finetune", "searched"]]


@pytest.mark.parametrize("nproc,argv,env", [
    (1, ("python", "-m", "stages.search"), {}),                     # one process asked for
    (2, ("python", "-m", "stages.base"), {}),                       # a single-process stage
    (2, ("python", "-m", "pytest"), {}),                            # not a stage at all
    (2, ("python", "-m", "stages.search"), {"LOCAL_RANK": "0"}),    # already a torchrun worker
    ("two", ("python", "-m", "stages.search"), {}),                 # invalid: validation reports it later
    (True, ("python", "-m", "stages.search"), {}),
    (None, ("python", "-m", "stages.search"), {}),
])
def test_everything_else_runs_as_it_was_started(execs, monkeypatch, nproc, argv, env):
    if nproc is not None:
        _params(nproc)
    _argv(monkeypatch, *argv)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    launch.relaunch_under_torchrun(STAGES)
    assert execs == []
