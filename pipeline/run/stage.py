"""What every stage script shares: validated params, an MLflow run, progress lines, the metrics
JSON (with the run id), and user errors and interruptions reported as one clear line instead of a
traceback."""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from pipeline.config import Params, load_params
from pipeline.errors import ConfigError, UserError
from pipeline.run import distributed, processes, tracking
from pipeline.run.outputs import metrics_path, write_json

USER_ERRORS = (UserError, FileNotFoundError)
PARAMS_FILE = "params.yaml"
_start = time.time()


def log(stage: str, message: str) -> None:
    print(f"[{stage} {time.time() - _start:7.1f}s] {message}", flush=True)


Body = Callable[[Params, Callable[[str], None], distributed.Group], dict]


def run_stage(name: str, sections: tuple[str, ...], body: Body, close_pipeline: bool = False) -> None:
    """Validate params.yaml, run `body(params, say, group)` inside the stage's MLflow run, write
    metrics/<stage>.json with the returned metrics and the run id.

    Under torchrun (stages/__init__.py starts the multi-process stages so) every rank runs `body`, and
    only rank 0 talks (progress lines, MLflow, the metrics file)."""
    stop_cleanly_on_signals()
    try:
        params = load_params(PARAMS_FILE)
    except ConfigError as err:
        sys.exit(f"error in {PARAMS_FILE}: {err}")
    group = distributed.init(params.compute.device)  # a single process unless torchrun started this one
    threads = distributed.set_threads(params.compute.threads)
    all_params = section_dicts(params, tuple(type(params).model_fields))

    def say(message: str) -> None:
        if group.is_main:
            log(name, message)

    ours = processes.run_pids(group.gather(os.getpid()))
    try:
        busy = None
        if group.is_main:
            try:
                processes.claim_workspace(name, ours)
            except processes.WorkspaceBusy as err:
                busy = str(err)
        if busy := group.broadcast(busy):
            raise processes.WorkspaceBusy(busy)
        with tracking.stage_run(name, section_dicts(params, sections), all_params, params.tracking.experiment,
                                enabled=params.tracking.enabled and group.is_main,
                                close_pipeline=close_pipeline) as run:
            started = time.time()
            say(f"{group.world} process{'es' if group.world > 1 else ''} on {group.device.type}, "
                f"{threads} thread{'s' if threads > 1 else ''} each")
            metrics = body(params, say, group)
            metrics["seconds"] = round(time.time() - started, 2)
            tracking.log_metrics({"seconds": metrics["seconds"]})
            metrics["mlflow_run_id"] = run.info.run_id if run else None
            if group.is_main:
                write_json(metrics_path(name), metrics)
    except USER_ERRORS as err:
        where = "" if group.is_main else f" (rank {group.rank})"
        sys.exit(f"error in stage {name}{where}: {err}")
    except StageInterrupted as interrupted:
        print(f"interrupted by {interrupted.signal_name}: rerun `dvc repro` to resume", file=sys.stderr, flush=True)
        sys.exit(128 + interrupted.signum)  # the shell's convention for "ended by signal N"
    finally:
        if group.is_main:
            processes.release_workspace(ours)
        distributed.close()
    say(f"done in {metrics['seconds']:.1f}s")


class StageInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so it passes `except Exception` and the MLflow
    run ends as KILLED, while every `finally` and context manager on the way out still runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def stop_cleanly_on_signals() -> None:
    """Turn SIGINT and SIGTERM into StageInterrupted. Python's default SIGTERM ends the process on
    the spot, skipping `finally` blocks and context managers: temporary folders and half-written
    temporary files would stay behind and the MLflow run would look still running. Later signals are
    ignored so that the (short) clean-up itself is not cut off; SIGKILL still ends it at once."""
    def interrupt(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise StageInterrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)


def section_dicts(params: Params, sections: tuple[str, ...]) -> dict:
    return {s: getattr(params, s).model_dump() for s in sections}

