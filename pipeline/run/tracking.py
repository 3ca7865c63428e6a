"""MLflow conventions: one parent run per pipeline execution, one child run per stage, found again
across the stage processes by a key. docs/architecture.md ("MLflow") says how the parent is found, where
the store is and why telemetry is switched off before mlflow is imported."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import numbers
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Must be set before mlflow is imported: its telemetry client is created at import time.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_AGENT_HINT", "1")  # import-time message aimed at coding agents
_MLFLOW_WAS_IMPORTED = "mlflow" in sys.modules

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelOutput, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline.run.hashing import json_sha256  # noqa: E402

if _MLFLOW_WAS_IMPORTED:  # imported before us: re-evaluate telemetry with the defaults above
    with contextlib.suppress(Exception):
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()

ROLE_TAG = "darwinlm.role"
# What MLflow's UI writes when a user marks the experiment "Machine learning" (not GenAI)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what mlflow accepts in param and metric names
# MLflow raises without psutil; GPUs are simply skipped without nvidia-ml-py.
_SYSTEM_METRICS = importlib.util.find_spec("psutil") is not None
if os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") is None:
    mlflow.set_system_metrics_sampling_interval(1)  # MLflow's 10 s would miss most demo stages
_disabled = False  # inside a disabled stage_run: the helpers must not log to another active run


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def tracking_root() -> Path:
    """``DVC_ROOT``, else the git top level of the cwd, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = _git("rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path.cwd().resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<tracking_root()>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(tracking_root() / 'mlflow.db').as_posix()}"


def _artifact_location(uri: str) -> str | None:
    """``<folder of the db>/mlartifacts`` for a sqlite store (not ``./mlruns`` of a temporary copy), else None."""
    db = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return None if db in ("", ":memory:") else (Path(db).resolve().parent / "mlartifacts").as_uri()


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"search": {"target": 0.5}}`` -> ``{"search.target": 0.5}``; lists become JSON, ``{}`` becomes ``"{}"``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key) if v else {key: "{}"})
        else:
            out[key] = json.dumps(v, default=str) if isinstance(v, (list, tuple, set, frozenset)) else v
    return out


def _key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:250]  # mlflow rejects (not truncates) longer keys


def _number(v: Any) -> float | None:
    """A real number as float (numpy scalars and 0-d tensors too); None for anything else, bools included."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, bool) or not isinstance(v, numbers.Real) else float(v)


@dataclasses.dataclass(frozen=True)
class StageRun:  # run_id is None when tracking is disabled; also readable as info.run_id, like mlflow's runs
    run_id: str | None
    parent_run_id: str | None = None
    experiment_id: str | None = None
    pipeline_key: str | None = None
    info = property(lambda self: self)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location, tags={KIND_TAG: KIND})
        except MlflowException:  # created meanwhile by a concurrent stage?
            if (exp := client.get_experiment_by_name(name)) is None:
                raise
    if exp.lifecycle_stage == "deleted":
        logging.getLogger(__name__).warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    if KIND_TAG not in exp.tags:  # created before this convention, by mlflow itself, or by hand
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def _parent_run(client: MlflowClient, experiment_id: str, key: str, tags: dict, all_params: Mapping) -> str:
    found = mlflow.search_runs([experiment_id], output_format="list", max_results=1,
                               filter_string=f"tags.pipeline_key = '{key}' and tags.`{ROLE_TAG}` = 'pipeline' "
                                             "and attributes.status = 'RUNNING'",
                               order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    # Not started with mlflow.start_run: it must outlive this process's run and stay RUNNING.
    run = client.create_run(experiment_id, run_name=f"pipeline {tags['dvc_experiment']}",
                            tags={**tags, ROLE_TAG: "pipeline"})
    client.log_batch(run.info.run_id, params=[Param(_key(k), str(v)) for k, v in flatten(all_params).items()])
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, stage_params: Mapping, all_params: Mapping, experiment: str,
              enabled: bool = True, close_pipeline: bool = False) -> Iterator[StageRun]:
    """One MLflow run for one stage execution, nested under the pipeline's parent run, with ``stage_params``
    as params. Ends FINISHED, or FAILED (KILLED for Ctrl-C) if an exception escapes; ``close_pipeline``
    also finishes the parent. Disabled: touches no store and yields a ``StageRun`` without ``run_id``."""
    global _disabled
    if not enabled:
        before, _disabled = _disabled, True
        try:
            yield StageRun(None)
        finally:
            _disabled = before
        return

    for name in ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics"):  # chatter on every stage
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment, _artifact_location(uri))
    commit = _git("rev-parse", "HEAD") or "unknown"
    dvc_exp = os.environ.get("DVC_EXP_NAME") or "workspace"
    key = json_sha256({"git_commit": commit, "dvc_experiment": dvc_exp, "params": all_params}, 16)
    common = {"git_commit": commit, "dvc_experiment": dvc_exp, "pipeline_key": key}
    parent_tags = {**common, "params_hash": json_sha256(all_params, 12)}
    parent_id = _parent_run(client, experiment_id, key, parent_tags, all_params)

    tags = {**common, "stage": stage, "params_hash": json_sha256(stage_params, 12), ROLE_TAG: "stage"}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags,
                           log_system_metrics=_SYSTEM_METRICS)
    try:
        mlflow.log_params({_key(k): v for k, v in flatten(stage_params).items()})  # mlflow clips long values
        yield StageRun(run.info.run_id, parent_id, experiment_id, key)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mlflow.set_tag("darwinlm.error", f"{type(exc).__name__}: {exc}")
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")
    if close_pipeline:
        client.set_terminated(parent_id, "FINISHED")


def _active() -> bool:
    return not _disabled and mlflow.active_run() is not None


def log_metrics(metrics: Mapping, step: int | None = None, model_id: str | None = None) -> None:
    """Log numbers of a (nested) dict with dotted keys; non-numbers (and bools) are skipped."""
    numbers_only = {_key(k): x for k, v in flatten(metrics).items() if (x := _number(v)) is not None}
    if _active() and numbers_only:
        mlflow.log_metrics(numbers_only, step=step, model_id=model_id)


def log_figure(fig, name: str) -> None:
    """A matplotlib figure as ``plots/<name>`` (``.png`` appended when ``name`` has no suffix)."""
    if _active():
        mlflow.log_figure(fig, f"plots/{name}" + ("" if Path(name).suffix else ".png"))


def log_dict(d: Mapping, name: str) -> None:
    """A dict as a JSON artifact (YAML if ``name`` ends in .yaml/.yml; ``.json`` appended if no suffix)."""
    if _active():  # through JSON first so that Paths and the like become strings in YAML too
        mlflow.log_dict(json.loads(json.dumps(d, default=str)), name + ("" if Path(name).suffix else ".json"))


def log_table(rows: list[dict], name: str) -> None:
    """Rows of a table (one dict per row, same keys) as an MLflow table artifact (``.json`` appended if no
    suffix), shown as a table in the run's artifacts and comparable across runs."""
    if _active() and rows:
        columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, in order of appearance
        mlflow.log_table({c: [row.get(c) for row in rows] for c in columns},
                         artifact_file=name + ("" if Path(name).suffix else ".json"))


def log_artifact(path: str | os.PathLike, folder: str) -> None:
    """A file as an artifact of the stage's run, under ``folder``."""
    if _active():
        mlflow.log_artifact(str(path), folder)


def set_tags(d: Mapping) -> None:
    if _active() and d:
        mlflow.set_tags({_key(str(k)): str(v) for k, v in d.items()})


def log_model(folder: str | os.PathLike, name: str, metrics: Mapping | None = None,
              register_as: str | None = None) -> str | None:
    """A saved Hugging Face model folder as a logged model of the stage's run (loaded with transformers, not
    an MLflow flavor), ``metrics`` linked to it, registered under ``register_as`` if given. Returns its id."""
    if not _active():
        return None
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"cannot log model '{folder}': no such folder")
    model = mlflow.initialize_logged_model(name=re.sub(r"[/:.%\"']", "_", name), model_type="huggingface")
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
