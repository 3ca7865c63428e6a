"""MLflow conventions of the pipeline: one parent run per pipeline execution, one child run per stage.

Each DVC stage is its own process, so the parent run cannot be passed along in memory. It is found
again by a key: ``pipeline_key`` = sha256(git commit, DVC experiment name, full params)[:16]. A
stage looks up the RUNNING run of the experiment tagged ``pipeline_key=<key>`` and
``darwinlm.role=pipeline``, creates it if there is none, and starts its own run nested under it.
The last stage (``close_pipeline=True``) marks the parent FINISHED, so a later execution with the
same key starts a new parent. A failed stage leaves the parent RUNNING: re-running the pipeline
with the same commit and params continues under the same parent.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db`` with artifacts in
``<root>/mlartifacts``; ``<root>`` is ``DVC_ROOT`` (set by DVC, and pointing at the original repo
for queued experiments run in a temp copy), else the git top level of the cwd, else the cwd.

Typical stage::

    with tracking.stage_run("search", stage_params, all_params, p.tracking.experiment,
                            enabled=p.tracking.enabled):
        ...
        tracking.log_metrics({"loss": loss}, step=i)   # no-op when tracking is disabled

Telemetry: MLflow decides at ``import mlflow`` (``MLFLOW_DISABLE_TELEMETRY`` or ``DO_NOT_TRACK``),
so both are defaulted to "true" here before mlflow is imported; a user's own setting wins. Import
this module before anything that imports mlflow: if mlflow comes first, its telemetry client is
switched off again here, but it has already written an installation id to ~/.config/mlflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import numbers
import os
import re
import subprocess
import sys
import time
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
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from pydantic import BaseModel  # noqa: E402

if _MLFLOW_WAS_IMPORTED:  # imported before us: re-evaluate telemetry with the defaults above
    with contextlib.suppress(Exception):
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()

__all__ = ["StageRun", "flatten", "log_artifacts", "log_dict", "log_figure", "log_metrics",
           "set_tags", "stage_run", "tracking_root", "tracking_uri"]

ROLE_TAG = "darwinlm.role"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what mlflow accepts in param and metric names

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- store location

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
    """For a sqlite store: ``<folder of the db>/mlartifacts`` (for the default store that is
    ``<root>/mlartifacts``). Otherwise None: the server or store chooses.

    Without this, mlflow's sqlite store puts artifacts under ``./mlruns`` of whatever the cwd is,
    which for a queued DVC experiment is a temp copy that gets deleted."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()


# ----------------------------------------------------------------------------- pure helpers

def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _jsonable(obj.model_dump())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _canonical_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _sha(obj: Any, n: int) -> str:
    return hashlib.sha256(_canonical_json(obj).encode()).hexdigest()[:n]


def flatten(d: Mapping | Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (or pydantic models such as the params) -> one level with dotted keys.

    ``{"search": {"target": 0.5}}`` -> ``{"search.target": 0.5}``. Lists, tuples and sets become
    JSON strings (so do any dicts inside them); an empty dict becomes ``"{}"``; scalars stay as they are.
    """
    out: dict[str, Any] = {}
    items = _jsonable(d) if isinstance(d, BaseModel) else d
    for k, v in items.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, BaseModel):
            v = _jsonable(v)
        if isinstance(v, Mapping):
            if v:
                out.update(flatten(v, key))
            else:
                out[key] = "{}"
        elif isinstance(v, (list, tuple, set, frozenset)):
            out[key] = json.dumps(_jsonable(v), default=str)
        else:
            out[key] = v
    return out


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY]


def _number(v: Any) -> float | None:
    """A finite or non-finite real number as float; None for anything else (bools included)."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # 0-d numpy array / torch tensor
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return float(v)


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str | None
    parent_run_id: str | None = None
    experiment_id: str | None = None


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What ``stage_run`` yields; ``info.run_id`` is None when tracking is disabled."""
    info: RunInfo
    pipeline_key: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.info.run_id


# (run id, tracking URI) of the open stage_run blocks, (None, None) for a disabled one; the
# helpers log to the last one.
_stack: list[tuple[str | None, str | None]] = []


def _current() -> tuple[str | None, MlflowClient | None]:
    run_id, uri = _stack[-1] if _stack else (None, None)
    return (run_id, MlflowClient(tracking_uri=uri)) if run_id else (None, None)


def _quiet_mlflow_logs() -> None:
    # "Creating initial MLflow database tables..." / "Updating database tables" on a new store.
    for name in ("mlflow.store.db.utils", "alembic"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.WARNING)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by a concurrent stage
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        _log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _find_or_create_parent(client: MlflowClient, experiment_id: str, key: str, tags: dict[str, str],
                           all_params: Mapping) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.pipeline_key = '{key}' and tags.`{ROLE_TAG}` = 'pipeline' "
                      "and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {tags['dvc_experiment']}",
                            tags={**tags, ROLE_TAG: "pipeline"})
    _log_params(client, run.info.run_id, all_params)
    return run.info.run_id


def _log_params(client: MlflowClient, run_id: str, params: Mapping) -> None:
    flat = flatten(params)
    if flat:
        client.log_batch(run_id, params=[Param(_key(k), _clip(str(v), MAX_PARAM_VALUE)) for k, v in flat.items()])


@contextlib.contextmanager
def stage_run(stage: str, stage_params: Mapping, all_params: Mapping, experiment: str,
              enabled: bool = True, close_pipeline: bool = False) -> Iterator[StageRun]:
    """One MLflow run for one stage execution, nested under the pipeline's parent run.

    Logs ``stage_params`` flattened as params and tags the run with ``stage``, ``git_commit``,
    ``dvc_experiment``, ``params_hash`` and ``pipeline_key``. On exit the run is FINISHED, or
    FAILED (KILLED for Ctrl-C) if an exception escapes (it is re-raised). With ``close_pipeline``
    a successful exit also marks the parent FINISHED. Disabled: touches no store and yields a
    ``StageRun`` whose ``info.run_id`` is None; the module's helpers are then no-ops.
    Must not be entered while another mlflow run is active in the process.
    """
    if not enabled:
        _stack.append((None, None))
        try:
            yield StageRun(RunInfo(None))
        finally:
            _stack.pop()
        return

    _quiet_mlflow_logs()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, _artifact_location(uri))

    commit = _git("rev-parse", "HEAD") or "unknown"
    dvc_exp = os.environ.get("DVC_EXP_NAME") or "workspace"
    key = _sha({"git_commit": commit, "dvc_experiment": dvc_exp, "params": all_params}, 16)
    common = {"git_commit": commit, "dvc_experiment": dvc_exp, "pipeline_key": key}
    parent_id = _find_or_create_parent(client, experiment_id, key,
                                       {**common, "params_hash": _sha(all_params, 12)}, all_params)

    tags = {**common, "stage": stage, "params_hash": _sha(stage_params, 12), ROLE_TAG: "stage"}
    active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags)
    run_id = active.info.run_id
    _stack.append((run_id, uri))
    try:
        _log_params(client, run_id, stage_params)
        yield StageRun(RunInfo(run_id, parent_id, experiment_id), key)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "darwinlm.error", _clip(f"{type(exc).__name__}: {exc}", MAX_TAG_VALUE))
        _end(client, run_id, status)
        raise
    else:
        _end(client, run_id, "FINISHED")
        if close_pipeline:
            client.set_terminated(parent_id, "FINISHED")
    finally:
        _stack.pop()


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:  # the stage left a run of its own open on top of ours: do not end that one
        client.set_terminated(run_id, status)


# ----------------------------------------------------------------------------- helpers (no-ops when disabled)

def log_metrics(metrics: Mapping, step: int | None = None) -> None:
    """Log numbers of a (nested) dict with dotted keys; non-numbers (and bools) are skipped."""
    run_id, client = _current()
    if run_id is None:
        return
    now = int(time.time() * 1000)
    batch = [Metric(_key(k), x, now, int(step or 0))
             for k, v in flatten(metrics).items() if (x := _number(v)) is not None]
    if batch:
        client.log_batch(run_id, metrics=batch)


def log_figure(fig, name: str) -> None:
    """A matplotlib figure as ``plots/<name>`` (``.png`` appended when ``name`` has no suffix)."""
    run_id, client = _current()
    if run_id is None:
        return
    if not Path(name).suffix:
        name += ".png"
    client.log_figure(run_id, fig, f"plots/{name}")


def log_artifacts(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """A file or a whole folder as artifact(s) under ``artifact_path``."""
    run_id, client = _current()
    if run_id is None:
        return
    p = Path(path)
    if p.is_dir():
        client.log_artifacts(run_id, str(p), artifact_path)
    elif p.is_file():
        client.log_artifact(run_id, str(p), artifact_path)
    else:
        raise FileNotFoundError(f"cannot log artifact '{p}': no such file or folder")


def log_dict(d: Mapping, name: str) -> None:
    """A dict as a JSON artifact (YAML if ``name`` ends in .yaml/.yml; ``.json`` appended if no suffix)."""
    run_id, client = _current()
    if run_id is None:
        return
    suffix = Path(name).suffix.lower()
    if not suffix:
        name += ".json"
    if suffix in (".yaml", ".yml"):
        client.log_dict(run_id, _jsonable(d), name)
    else:
        client.log_text(run_id, json.dumps(_jsonable(d), indent=2, default=str), name)


def set_tags(d: Mapping) -> None:
    run_id, client = _current()
    if run_id is None or not d:
        return
    client.log_batch(run_id, tags=[RunTag(_key(str(k)), _clip(str(v), MAX_TAG_VALUE)) for k, v in d.items()])
