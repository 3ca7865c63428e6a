"""MLflow conventions (pipeline/run/tracking.py) against a real sqlite store in a temp git repo."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# First, before anything imports mlflow: it decides about telemetry at import time.
from pipeline.run import tracking  # isort: skip
from pipeline.run.tracking import flatten, stage_run  # isort: skip

import matplotlib
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# mlflow 3.17's sqlite store triggers this SQLAlchemy deprecation once per process; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

EXPERIMENT = "darwinlm-test"
ALL_PARAMS = {"model": {"name_or_path": "demo"}, "search": {"target": 0.5, "levels": [1, 2]},
              "finetune": {"steps": 10}}
ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
       "MLFLOW_EXPERIMENT_ID")


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    """An empty, migrated store; creating one costs seconds, copying it does not."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def repo(tmp_path, monkeypatch, template_db):
    """cwd = a git repo with one commit and a store at <repo>/mlflow.db (the default location)."""
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "commit", "-q", "--allow-empty", "-m", "init")
    shutil.copy(template_db, root / "mlflow.db")
    monkeypatch.chdir(root)
    yield root
    while mlflow.active_run():
        mlflow.end_run()


def _client(root):
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _exp_id(client):
    return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _children(client, parent_id):
    return client.search_runs([_exp_id(client)], f"tags.mlflow.parentRunId = '{parent_id}'")


def _stage(name, stage_params=None, all_params=ALL_PARAMS, **kw):
    return stage_run(name, stage_params if stage_params is not None else {}, all_params, EXPERIMENT, **kw)


def _parent(run):
    return run.data.tags["mlflow.parentRunId"]


def test_flatten():
    assert flatten({"search": {"target": 0.5, "inner": {"k": 1}}, "top": "x"}) == {
        "search.target": 0.5, "search.inner.k": 1, "top": "x"}
    assert flatten({"a": [1, 2], "b": {"c": [{"d": 1}]}, "t": (1,), "e": {}, "n": None, "x@y,z": 1}) == {
        "a": "[1, 2]", "b.c": '[{"d": 1}]', "t": "[1]", "n": None, "x_y_z": 1}


def test_store_location_follows_dvc_root_then_cwd(repo, tmp_path, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{repo}/mlflow.db"
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert tracking.tracking_uri() == f"sqlite:///{plain}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.tracking_uri() == f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri() == "sqlite:////elsewhere/x.db"


def test_default_store_and_artifacts_land_under_dvc_root(repo, tmp_path, monkeypatch):
    work = tmp_path / "queued-copy"  # a queued experiment runs in a temp copy; DVC_ROOT = original repo
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with _stage("database") as run:
        tracking.log_figure(fig, "plots/curve.png")
        tracking.log_dict({"a": [1, 2], "p": "x"}, "summary.json")
        tracking.log_table(pd.DataFrame([{"method": "flap", "ppl": 3.5}, {"method": "cfsp", "kl": 0.1}]), "panel.json")
    plt.close(fig)
    png = repo / "mlartifacts" / run.info.run_id / "artifacts" / "plots" / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (repo / "mlartifacts" / run.info.run_id / "artifacts" / "summary.json").is_file()
    table = _client(repo).load_table(run.info.experiment_id, "panel.json", [run.info.run_id])
    assert list(table.columns) == ["method", "ppl", "kl"] and list(table["method"]) == ["flap", "cfsp"]
    assert [f.path for f in _client(repo).list_artifacts(run.info.run_id, "plots")] == ["plots/curve.png"]
    assert list(work.iterdir()) == []  # nothing (no mlruns/) in the cwd


def test_stages_of_one_execution_share_a_parent(repo):
    head = _git(repo, "rev-parse", "HEAD")
    with _stage("database", {"database": {"levels": 4, "groups": ["attn", "mlp"]}}) as a:
        pass
    with _stage("finetune@searched", {"finetune": {"steps": 10}}) as b:
        pass
    client = _client(repo)
    parent_id = _parent(a)
    assert parent_id and parent_id == _parent(b)
    assert {r.info.run_id for r in _children(client, parent_id)} == {a.info.run_id, b.info.run_id}

    parent = client.get_run(parent_id)
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["darwinlm.role"] == "pipeline"
    assert parent.data.tags["pipeline_key"] == a.data.tags["pipeline_key"] and len(parent.data.tags["pipeline_key"]) == 16
    assert parent.data.tags["mlflow.runName"] == "pipeline workspace"
    assert parent.data.params["search.target"] == "0.5"  # the full params, for comparing pipelines

    child = client.get_run(b.info.run_id)
    tags = child.data.tags
    assert child.info.status == "FINISHED"
    assert tags["stage"] == "finetune@searched" == tags["mlflow.runName"]
    assert tags["git_commit"] == head
    assert tags["dvc_experiment"] == "workspace"
    assert tags["mlflow.parentRunId"] == parent_id
    assert len(tags["params_hash"]) == 12
    assert tags["params_hash"] != client.get_run(a.info.run_id).data.tags["params_hash"]
    assert client.get_run(a.info.run_id).data.params == {"database.levels": "4",
                                                         "database.groups": '["attn", "mlp"]'}


def test_params_hash_and_key_ignore_dict_order(repo):
    with _stage("search", {"b": 1, "a": {"y": 2, "x": 1}}) as a:
        pass
    reordered = {k: ALL_PARAMS[k] for k in reversed(list(ALL_PARAMS))}
    with _stage("search", {"a": {"x": 1, "y": 2}, "b": 1}, reordered) as b:
        pass
    client = _client(repo)
    assert _parent(a) == _parent(b)
    assert (client.get_run(a.info.run_id).data.tags["params_hash"]
            == client.get_run(b.info.run_id).data.tags["params_hash"])


def test_failing_stage_is_failed_reraises_and_leaves_the_parent_open(repo):
    with pytest.raises(RuntimeError, match="boom"), _stage("search") as run:
        raise RuntimeError("boom")
    client = _client(repo)
    failed = client.get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert "boom" in failed.data.tags["darwinlm.error"]
    assert client.get_run(_parent(run)).info.status == "RUNNING"
    assert mlflow.active_run() is None
    with _stage("search") as retry:  # the retry continues the same pipeline execution
        pass
    assert _parent(retry) == _parent(run)


def test_close_pipeline_finishes_the_parent_and_the_next_execution_gets_a_new_one(repo):
    with _stage("database") as first:
        pass
    with pytest.raises(ValueError):  # a failing last stage does not close the parent
        with _stage("evaluate", close_pipeline=True):
            raise ValueError
    client = _client(repo)
    assert client.get_run(_parent(first)).info.status == "RUNNING"
    with _stage("evaluate", close_pipeline=True) as last:
        pass
    assert _parent(last) == _parent(first)
    assert client.get_run(_parent(first)).info.status == "FINISHED"
    assert client.get_run(last.info.run_id).info.status == "FINISHED"

    with _stage("database") as again:  # same commit, experiment and params: a new execution
        pass
    assert again.data.tags["pipeline_key"] == first.data.tags["pipeline_key"]
    assert _parent(again) != _parent(first)
    assert client.get_run(_parent(again)).info.status == "RUNNING"


def test_experiment_name_commit_and_params_each_give_their_own_parent(repo, monkeypatch):
    with _stage("database") as base:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a1b2")
    with _stage("database") as named:
        pass
    with _stage("database", all_params={**ALL_PARAMS, "finetune": {"steps": 11}}) as other_params:
        pass
    _git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    with _stage("database") as other_commit:
        pass
    parents = {_parent(r) for r in (base, named, other_params, other_commit)}
    assert len(parents) == 4
    client = _client(repo)
    assert client.get_run(_parent(named)).data.tags["dvc_experiment"] == "exp-a1b2"
    assert client.get_run(_parent(named)).info.run_name == "pipeline exp-a1b2"
    assert client.get_run(named.info.run_id).data.tags["dvc_experiment"] == "exp-a1b2"


def test_metrics_with_steps_nested_keys_and_non_numbers_skipped(repo):
    np = pytest.importorskip("numpy")
    with _stage("finetune@searched") as run:
        for step in range(3):
            tracking.log_metrics({"loss": 1.0 / (step + 1), "eval": {"ppl": np.float32(3.5)},
                                  "note": "text", "flag": True, "layers": [1, 2]}, step=step)
        tracking.log_metrics({"final@searched": 2})
        tracking.set_tags({"device": "cpu"})
    client = _client(repo)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    data = client.get_run(run.info.run_id).data
    assert set(data.metrics) == {"loss", "eval.ppl", "final_searched"}
    assert data.metrics["eval.ppl"] == 3.5
    assert data.tags["device"] == "cpu"


def test_long_param_values_are_truncated(repo):
    with _stage("search", {"s": "x" * 10_000, "l": list(range(5000))}) as run:  # mlflow clips to 6000
        pass
    params = _client(repo).get_run(run.info.run_id).data.params
    assert params["s"] == "x" * 6000
    assert len(params["l"]) == 6000 and params["l"].startswith("[0, 1, 2")


def test_explicit_tracking_uri_keeps_artifacts_next_to_the_db(repo, tmp_path, monkeypatch, template_db):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(template_db, store / "custom.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'custom.db'}")
    with _stage("database") as run:
        tracking.log_dict({"a": 1}, "summary.json")
    assert (store / "mlartifacts" / run.info.run_id / "artifacts" / "summary.json").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'custom.db'}")
    assert client.get_run(run.info.run_id).data.tags["stage"] == "database"
    assert client.get_experiment_by_name("Default") is not None
    assert _client(repo).get_experiment_by_name(EXPERIMENT) is None  # the default store stayed untouched


def test_disabled_touches_no_store_and_helpers_are_no_ops(tmp_path, monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    fig = plt.figure()
    with _stage("database", {"a": 1}, enabled=False) as run:
        assert run is None
        tracking.log_metrics({"loss": 1.0}, step=0)
        tracking.log_figure(fig, "plots/x.png")
        tracking.log_dict({"a": 1}, "d.json")
        tracking.log_table(pd.DataFrame([{"a": 1}]), "t.json")
        tracking.log_artifact(__file__, "files")
        tracking.set_tags({"a": "b"})
    plt.close(fig)
    with pytest.raises(KeyError), _stage("evaluate", enabled=False, close_pipeline=True):
        raise KeyError("x")
    tracking.log_metrics({"loss": 1.0})  # outside any stage_run: also a no-op
    tracking.log_dict({"a": 1}, "d.json")
    assert list(tmp_path.iterdir()) == []
    assert mlflow.active_run() is None


def test_import_turns_telemetry_off_unless_the_user_chose(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_DISABLE_AGENT_HINT")}
    env.update(DO_NOT_TRACK="false", AGENT="1", HOME=str(tmp_path),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import os, pipeline.run.tracking\n"
            "from mlflow.telemetry import get_telemetry_client\n"
            "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], os.environ['DO_NOT_TRACK'], get_telemetry_client())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["true", "false", "None"]
    assert out.stderr == ""  # e.g. no import-time hint for coding agents
    assert not (tmp_path / ".config" / "mlflow").exists()  # no telemetry installation id written


def test_disabled_stage_does_not_log_to_another_active_run(repo):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    outer = mlflow.start_run()
    with _stage("database", enabled=False):
        tracking.log_metrics({"loss": 1.0})
        tracking.set_tags({"a": "b"})
    mlflow.end_run()
    data = _client(repo).get_run(outer.info.run_id).data
    assert data.metrics == {} and "a" not in data.tags


def test_experiment_opens_as_machine_learning_not_genai(repo):
    client = _client(repo)
    with _stage("database"):
        pass
    assert client.get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"
    other = client.create_experiment("made-elsewhere")  # existing, without the tag: it gets one
    with stage_run("database", {}, ALL_PARAMS, "made-elsewhere"):
        pass
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"


def test_results_land_on_the_pipeline_run_and_the_ui_address_opens_the_runs(repo):
    """The UI's runs table shows parent runs (stage runs folded under them): the parent carries the results,
    steps included, and the printed address asks for the machine-learning runs view, not GenAI's overview."""
    client = _client(repo)
    with _stage("evaluate") as run:
        tracking.log_pipeline_metrics({"ppl": {"searched": 7.5}, "note": "text"})
        for tokens, value in ((0, 20.0), (512, 9.0)):
            tracking.log_pipeline_metrics({"recovery_ppl.searched": value}, step=tokens)
    parent = client.get_run(_parent(client.get_run(run.info.run_id)))
    assert parent.data.metrics["ppl.searched"] == 7.5 and "note" not in parent.data.metrics
    history = client.get_metric_history(parent.info.run_id, "recovery_ppl.searched")
    assert [(m.step, m.value) for m in history] == [(0, 20.0), (512, 9.0)]
    address = tracking.ui_address(EXPERIMENT, "http://host:5000")
    assert address == (f"http://host:5000/#/experiments/{_exp_id(client)}/runs?workflowType=machine_learning"
                       "&compareRunsMode=CHART")
    assert "no runs" in tracking.ui_address("never-created")


def test_stage_runs_record_system_metrics(repo, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with _stage("database") as run:
        time.sleep(0.7)  # a few sampling intervals
    client = _client(repo)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 2


def test_log_model_records_a_logged_model_with_metrics_and_registers_it(repo, tmp_path):
    folder = tmp_path / "model_searched"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    with _stage("finetune@searched") as run:
        model_id = tracking.log_model(folder, "finetune@searched", {"ppl": 12.5, "eval": {"loss": 2.5}, "x": "no"},
                                      register_as="darwinlm-searched")
    client = _client(repo)
    [model] = client.search_logged_models([run.info.experiment_id],
                                          filter_string=f"source_run_id = '{run.info.run_id}'")
    assert model.model_id == model_id and model.status == LoggedModelStatus.READY
    assert {m.key: m.value for m in model.metrics} == {"ppl": 12.5, "eval.loss": 2.5}
    assert {m.key for m in model.metrics if m.run_id == run.info.run_id} == {"ppl", "eval.loss"}
    assert client.get_run(run.info.run_id).data.metrics["ppl"] == 12.5
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [model_id]
    assert sorted(f.path for f in client.list_logged_model_artifacts(model_id)) == ["config.json",
                                                                                   "model.safetensors"]
    version = client.get_model_version("darwinlm-searched", "1")
    assert version.source == f"models:/{model_id}"
    assert '"version": 1' in client.get_logged_model(model_id).tags["mlflow.modelVersions"]
    with _stage("evaluate", enabled=False):
        assert tracking.log_model(folder, "x", register_as="darwinlm-searched") is None
