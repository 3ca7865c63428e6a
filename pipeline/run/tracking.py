"""MLflow conventions: one parent run per pipeline execution, one child run per stage, found again
across the stage processes by a key. docs/architecture.md ("MLflow") says how the parent is found, where
the store is and why telemetry is switched off before mlflow is imported."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import numbers
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

# Must be set before mlflow is imported: its telemetry client is created at import time.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_AGENT_HINT", "1")  # import-time message aimed at coding agents
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's 10 s would miss most demo stages

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelOutput  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline.run.hashing import json_sha256  # noqa: E402

ROLE_TAG = "darwinlm.role"
# What MLflow's UI writes when a user marks the experiment "Machine learning" (not GenAI)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what mlflow accepts in param and metric names


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``: root is ``DVC_ROOT`` (the repository, also
    for a queued experiment run in a temporary copy), else the cwd, where the stages run."""
    root = Path(os.environ.get("DVC_ROOT") or ".").resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.as_posix()}/mlflow.db"


def flatten(d: Mapping) -> dict[str, Any]:
    """``{"search": {"target": 0.5, "levels": [1, 2]}}`` -> ``{"search.target": 0.5, "search.levels": "[1, 2]"}``,
    with keys mlflow accepts (it refuses, not clips, longer ones) and lists as JSON; empty dicts are left out."""
    flat = pd.json_normalize(dict(d)).to_dict("records")[0]
    return {_BAD_KEY_CHARS.sub("_", k)[:250]: json.dumps(v, default=str) if isinstance(v, list | tuple) else v
            for k, v in flat.items()}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def _experiment_id(name: str) -> str:
    """The experiment's id, restored if deleted. A new one keeps its artifacts next to a sqlite store, not in
    ``./mlruns`` of the cwd (perhaps a queued experiment's temporary copy)."""
    client, uri = MlflowClient(), mlflow.get_tracking_uri()
    if (experiment := client.get_experiment_by_name(name)) is None:
        db = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else ""
        artifacts = (Path(db).resolve().parent / "mlartifacts").as_uri() if db not in ("", ":memory:") else None
        try:
            client.create_experiment(name, artifacts)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # else created meanwhile by a concurrent stage
                raise
        experiment = client.get_experiment_by_name(name)
    elif experiment.lifecycle_stage == "deleted":
        logging.getLogger(__name__).warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    if KIND_TAG not in experiment.tags:  # created here, by mlflow itself or by hand
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    return experiment.experiment_id


def _parent_run(experiment_id: str, tags: dict, all_params: Mapping) -> str:
    """The RUNNING parent run of this pipeline execution, found by its key, or a new one with every param."""
    found = mlflow.search_runs([experiment_id], output_format="list", max_results=1,
                               filter_string=f"tags.pipeline_key = '{tags['pipeline_key']}' and "
                                             f"tags.`{ROLE_TAG}` = 'pipeline' and attributes.status = 'RUNNING'",
                               order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    # Not started with mlflow.start_run: it must outlive this process's run and stay RUNNING.
    run = MlflowClient().create_run(experiment_id, run_name=f"pipeline {tags['dvc_experiment']}",
                                    tags={**tags, ROLE_TAG: "pipeline"})
    mlflow.log_params(flatten(all_params), run_id=run.info.run_id)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, stage_params: Mapping, all_params: Mapping, experiment: str,
              enabled: bool = True, close_pipeline: bool = False) -> Iterator[mlflow.ActiveRun | None]:
    """One MLflow run for one stage execution, nested under the pipeline's parent run, with ``stage_params``
    as params and system metrics. Ends FINISHED, or FAILED (KILLED for Ctrl-C) if an exception escapes;
    ``close_pipeline`` also finishes the parent. Disabled: touches no store and yields None."""
    if not enabled:
        yield None
        return
    for name in ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics"):  # chatter on every stage
        logging.getLogger(name).setLevel(logging.getLogger(name).level or logging.WARNING)  # unless set already
    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(experiment)
    commit, dvc_exp = _git_commit(), os.environ.get("DVC_EXP_NAME") or "workspace"
    key = json_sha256({"git_commit": commit, "dvc_experiment": dvc_exp, "params": all_params}, 16)
    common = {"git_commit": commit, "dvc_experiment": dvc_exp, "pipeline_key": key}
    parent_id = _parent_run(experiment_id, {**common, "params_hash": json_sha256(all_params, 12)}, all_params)
    tags = {**common, "stage": stage, "params_hash": json_sha256(stage_params, 12), ROLE_TAG: "stage"}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags,
                          log_system_metrics=True) as run:
        mlflow.log_params(flatten(stage_params))  # mlflow clips long values
        try:
            yield run
        except BaseException as exc:  # ending the run here, as mlflow would end it FAILED even for Ctrl-C
            with contextlib.suppress(Exception):
                mlflow.set_tag("darwinlm.error", f"{type(exc).__name__}: {exc}")
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    if close_pipeline:
        MlflowClient().set_terminated(parent_id, "FINISHED")


def _in_stage_run(log: Callable) -> Callable:
    """``log``, made a no-op unless an enabled stage_run is active: mlflow would otherwise log to whatever run
    the caller has open, or start one of its own."""
    @functools.wraps(log)
    def logged(*args, **kwargs):
        run = mlflow.active_run()
        return log(*args, **kwargs) if run and run.data.tags.get(ROLE_TAG) == "stage" else None
    return logged


log_figure = _in_stage_run(mlflow.log_figure)
log_dict = _in_stage_run(mlflow.log_dict)
log_table = _in_stage_run(mlflow.log_table)
log_artifact = _in_stage_run(mlflow.log_artifact)
set_tags = _in_stage_run(mlflow.set_tags)


@_in_stage_run
def log_pipeline_metrics(metrics: Mapping, step: int | None = None) -> None:
    """Log ``metrics`` on the pipeline's parent run as well: the UI's runs table shows the parent runs, one per
    pipeline execution, with the stage runs folded under them, so results compare there only if the parents
    carry them."""
    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    values = {k: v for k, v in flatten(metrics).items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
    if parent and values:
        mlflow.log_metrics(values, step=step, run_id=parent)


def ui_address(experiment: str, host: str = "http://127.0.0.1:5000") -> str:
    """Where the MLflow UI shows this project's runs: MLflow 3.17 opens an experiment on its GenAI overview
    unless the address asks for the machine-learning workflow; the chart view compares the pipeline runs."""
    mlflow.set_tracking_uri(tracking_uri())
    found = MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        return f"{host} (no runs in experiment {experiment!r} yet: run the pipeline first)"
    return f"{host}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"


@_in_stage_run
def log_metrics(metrics: Mapping, step: int | None = None, model_id: str | None = None) -> None:
    """Logs the numbers of a (nested) dict with dotted keys; anything else, bools included, is skipped."""
    values = {k: v for k, v in flatten(metrics).items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
    if values:
        mlflow.log_metrics(values, step=step, model_id=model_id)


@_in_stage_run
def log_model(folder: str | os.PathLike, name: str, metrics: Mapping | None = None,
              register_as: str | None = None) -> str | None:
    """A saved Hugging Face model folder as a logged model of the stage's run (loaded with transformers, not
    an MLflow flavor), ``metrics`` linked to it, registered under ``register_as`` if given. Returns its id
    (None when not tracked)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"cannot log model '{folder}': no such folder")
    model = mlflow.initialize_logged_model(name=name, model_type="huggingface")
    mlflow.log_outputs([LoggedModelOutput(model.model_id, step=0)])  # listed as an output of the run
    try:
        MlflowClient().log_model_artifacts(model.model_id, str(folder))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    log_metrics(metrics or {}, model_id=model.model_id)
    if register_as:
        mlflow.register_model(f"models:/{model.model_id}", register_as)
    return model.model_id


if __name__ == "__main__":  # `make ui` prints where to look
    from pipeline.config import load_params
    print("MLflow UI, the pipeline runs side by side:", ui_address(load_params("params.yaml").tracking.experiment))
