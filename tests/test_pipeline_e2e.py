"""The whole pipeline for real: `dvc repro` on a tiny config in a temporary git repo, its outputs,
the MLflow runs in the repo-root sqlite store, selective re-runs, bad params, and `dvc exp run`."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT
from safetensors.torch import load_file

TINY = {
    "demo": dict(corpus_bytes=150_000, eval_bytes=40_000, vocab_size=300, hidden_size=32, num_layers=2,
                 num_heads=4, num_kv_heads=2, intermediate_size=48, seq_len=32, steps=30, batch_size=8),
    "data": dict(seq_len=32, calib_tokens=2048, fitness_tokens=1024, train_tokens=2048, eval_tokens=1024),
    "database": dict(levels=4),
    "search": dict(generations=3, offspring=4, eval_every=2, schedule=[{"survivors": 2, "fitness_tokens": 256, "train_tokens": 64},
                                                        {"survivors": 1, "fitness_tokens": 1024, "train_tokens": 0}]),
    "finetune": dict(steps=5, batch_size=4),
    "evaluate": dict(speed_prompt_len=16, speed_decode_tokens=4, speed_repeats=2,  # tests/test_baselines.py: all 7
                     baselines=["wanda_sp", "flap", "minitron", "ziplm"], finetune_baselines=["minitron"]),
    "tracking": dict(experiment="e2e"),
    "compute": dict(nproc=1),  # tests/test_distributed.py covers several processes; here they would only add startup
}
STAGES = ["base", "calibration", "database", "uniform", "search", "finetune@searched", "finetune@uniform", "baselines",
          "recovery", "export", "size_dense", "size_panel", "evaluate"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return env


def _run(repo, *cmd, check=True):
    result = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _edit_params(repo, section, **values):
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e")
    for item in ("pipeline", "stages"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".gitignore", "params.yaml"):
        shutil.copy(ROOT / item, repo / item)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "config", "user.email", "t@example.com")
    _run(repo, "git", "config", "user.name", "test")
    _run(repo, "dvc", "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny pipeline")
    result = _run(repo, "dvc", "repro")
    (repo / "repro.log").write_text(result.stdout)
    return repo


def _metrics(repo, name):
    return json.loads((repo / "metrics" / f"{name}.json").read_text())


def test_repro_produces_every_output(repo):
    m = _metrics(repo, "evaluate")
    for key in ("dense", "searched_oneshot", "searched_finetuned", "uniform_oneshot", "uniform_finetuned"):
        assert 1 < m["ppl"][key] < 1000, key
    # The method at work, not only the plumbing: the search beats the uniform allocation at (nearly) the same
    # size, and recovery training helps both.
    assert m["ppl"]["searched_oneshot"] < m["ppl"]["uniform_oneshot"]
    assert m["ppl"]["searched_finetuned"] < m["ppl"]["searched_oneshot"]
    assert m["ppl"]["uniform_finetuned"] < m["ppl"]["uniform_oneshot"]
    tolerance = yaml.safe_load((repo / "params.yaml").read_text())["search"]["budget_tolerance"]
    uniform = _metrics(repo, "uniform")
    dense_prunable = uniform["prunable_params"] / (1 - uniform["removed_fraction"])
    assert abs(m["params"]["pruned"] - m["params"]["uniform"]) <= tolerance * dense_prunable + 1
    assert m["params"]["pruned"] < m["params"]["dense"] and m["params"]["uniform"] < m["params"]["dense"]
    assert m["speed"]["searched"]["decode_ms_per_token"] > 0 and "CPU" in m["device"]
    assert set(m["speedup"]) == {"searched", "uniform"}
    panel = m["panel"]  # the baselines stage's rows, merged
    assert set(panel) == {"searched", "uniform", "wanda_sp", "flap", "minitron", "ziplm"}
    assert all(1 < row["ppl_oneshot"] < 1000 and row["kl"] >= 0 for row in panel.values())
    assert panel["searched"]["ppl_finetuned"] == m["ppl"]["searched_finetuned"]
    assert 1 < panel["minitron"]["ppl_finetuned"] < 1000 and "ppl_finetuned" not in panel["flap"]  # finetune_baselines
    assert (repo / "levels/baselines/flap.json").is_file() and (repo / "plots/baselines.csv").is_file()
    levels = json.loads((repo / "levels/searched.json").read_text())
    uniform = json.loads((repo / "levels/uniform.json").read_text())
    assert levels != uniform  # the search moved away from its uniform start
    assert (repo / "models/pruned/config.json").is_file() and (repo / "models/pruned/layer_structure.png").is_file()
    card = (repo / "models/uniform/README.md").read_text()
    assert "| pruned and trained |" in card and "Uniformly pruned" in card
    log = (repo / "repro.log").read_text()
    assert "generation 3/3" in log and "layer 2/2" in log and "pretrain step" in log  # progress is shown


def test_pruned_folder_reloads_with_the_evaluated_perplexity(repo):
    from pipeline.evaluate import perplexity
    from pipeline.model.export import load_pruned
    model = load_pruned(repo / "models/pruned")
    tokens = torch.load(repo / "data/tokens/eval.pt")
    assert perplexity(model, tokens, 8) == pytest.approx(_metrics(repo, "evaluate")["ppl"]["searched_finetuned"],
                                                         rel=1e-5)


def test_mlflow_runs_nest_under_one_parent_with_tags_params_and_upstream_ids(repo):
    from mlflow import MlflowClient
    assert (repo / "mlflow.db").is_file() and (repo / "mlartifacts").is_dir()
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("darwinlm.role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == sorted(STAGES)
    for stage, run in children.items():
        assert run.data.tags["dvc_experiment"] == "workspace" and len(run.data.tags["git_commit"]) == 40
        assert _metrics(repo, stage.replace("@", "_"))["mlflow_run_id"] == run.info.run_id
    evaluate = children["evaluate"]
    for stage in STAGES[:-1]:
        assert evaluate.data.tags[f"upstream.{stage.replace('@', '_')}"] == children[stage].info.run_id
    assert evaluate.data.params["search.target"] == "0.5" and evaluate.data.params["finetune.lr"] == "0.001"
    assert evaluate.data.metrics["ppl.searched_oneshot"] > 0
    assert parents[0].data.metrics["ppl.searched_oneshot"] == evaluate.data.metrics["ppl.searched_oneshot"]  # the UI's row
    fitness = client.get_metric_history(children["search"].info.run_id, "fitness")
    assert [m.step for m in fitness] == [1, 2, 3]
    # the pruned models are MLflow logged models of the evaluate run, with their metrics linked
    models = {m.name: m for m in client.search_logged_models(
        experiment_ids=[evaluate.info.experiment_id], filter_string=f"source_run_id = '{evaluate.info.run_id}'")}
    assert set(models) == {"pruned_searched", "pruned_uniform"}
    searched = models["pruned_searched"]
    assert {m.key: m.value for m in searched.metrics}["ppl_finetuned"] == pytest.approx(
        _metrics(repo, "evaluate")["ppl"]["searched_finetuned"])
    assert "config.json" in [a.path for a in client.list_logged_model_artifacts(searched.model_id)]
    plots = [a.path for a in client.list_artifacts(children["search"].info.run_id, "plots")]
    assert "plots/search_curve.png" in plots


def _stale(repo):
    status = json.loads(_run(repo, "dvc", "status", "--json").stdout or "{}")
    return {name.split(":")[-1] for name in status} - {"validate"}


def test_param_changes_rerun_only_the_stages_that_depend_on_them(repo):
    original = (repo / "params.yaml").read_text()
    try:
        assert _stale(repo) == set()
        _edit_params(repo, "finetune", lr=0.002)
        # evaluate follows via their outputs; the baselines and recovery stages train their models alike
        assert _stale(repo) == {"finetune@searched", "finetune@uniform", "baselines", "recovery"}
        (repo / "params.yaml").write_text(original)
        _edit_params(repo, "database", damp=0.02)
        assert _stale(repo) == {"database"}
        (repo / "params.yaml").write_text(original)
        _edit_params(repo, "search", target=0.6)
        assert _stale(repo) == {"uniform", "search"}
    finally:
        (repo / "params.yaml").write_text(original)


def test_a_corpus_edited_in_place_reruns_calibration(repo):
    import inspect
    original = (repo / "params.yaml").read_text()
    corpus = repo / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))  # ~3000 lines of Python: enough for the tiny budgets
    try:
        _edit_params(repo, "data", train="corpus.txt")
        _run(repo, "dvc", "repro", "calibration")
        status = lambda: json.loads(_run(repo, "dvc", "status", "calibration", "--json").stdout or "{}")  # noqa: E731
        assert status() == {}
        with corpus.open("a") as f:
            f.write("\n# one more line, same params\n")
        _run(repo, "dvc", "repro", "validate")
        assert "calibration" in status()  # checks/data.json changed with the text
    finally:
        (repo / "params.yaml").write_text(original)
        corpus.unlink()
        _run(repo, "dvc", "repro")


def test_bad_params_stop_before_any_stage_and_keep_earlier_outputs(repo):
    original = (repo / "params.yaml").read_text()
    before = (repo / "models/pruned/model.safetensors").read_bytes()
    try:
        _edit_params(repo, "finetune", lr=0.002, stepz=3)
        result = _run(repo, "dvc", "repro", check=False)
        assert result.returncode != 0
        assert "unknown key 'finetune.stepz'" in result.stdout + result.stderr
        assert (repo / "models/pruned/model.safetensors").read_bytes() == before
    finally:
        (repo / "params.yaml").write_text(original)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (requirements-eval.txt)")
def test_a_file_size_budget_runs_the_searches_and_the_llama_cpp_panel(repo):
    """size.budgets switches on size_dense, size@<budget> and size_panel: each row's file is as big as the
    search counted and within tolerance, and every file is measured in llama.cpp; emptied again, the
    stages stand down and the rest of the pipeline stays cached."""
    _edit_params(repo, "size", budgets=[0.5], presets=["q8_0"], rows=["joint", "quant"], generations=2,
                 eval_windows=2, speed_repeats=1, cache_mb=64)
    result = _run(repo, "dvc", "repro", "size_panel")
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"validate", "size_dense", "size@0.5", "size_panel"}, ran
    budget = json.loads((repo / "size" / "0.5" / "budget.json").read_text())
    dense = json.loads((repo / "size" / "dense" / "sizes.json").read_text())
    assert budget["bytes"] == int(0.5 * dense["f16"])
    for row in ("joint", "quant"):
        record = budget["rows"][row]
        assert record["bytes"] == record["counted_bytes"] == (repo / "size" / "0.5" / f"{row}.gguf").stat().st_size
        assert record["within_tolerance"] and abs(record["bytes"] / budget["bytes"] - 1) <= 0.005
    panel = _metrics(repo, "size_panel")["rows"]
    assert set(panel) == {"dense-f16", "dense-q8_0", "dense-q8_0-imatrix", "joint@0.5", "quant@0.5"}
    assert panel["dense-f16"]["kl"] == 0 and 0 < panel["dense-q8_0"]["kl"] < panel["joint@0.5"]["kl"]
    assert all(0 < r["top1_agreement"] <= 1 and r["ppl"] > 1 for r in panel.values())
    assert (repo / "plots" / "size" / "0.5-joint.png").is_file()
    _edit_params(repo, "size", budgets=[])
    result = _run(repo, "dvc", "repro")
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"validate", "size_dense", "size_panel", "evaluate"}, ran  # evaluate carries the panel's run id


KILLS = [  # stage, params that make it long enough to kill, the progress line to kill at, its result, resume message
    ("database", {"database": {"levels": 6}}, "layer 1/2 mlp", "database/manifest.json",
     "resuming the interrupted database build ("),
    ("search", {"search": {"generations": 8}}, "generation 4/8", "levels/searched.json",
     "resuming the interrupted search after generation"),
    ("finetune@searched", {"finetune": {"steps": 40, "checkpoint_every": 5}}, "step 26/40",
     "models/pruned/model.safetensors", "resuming the interrupted training"),
]
# SIGKILL: a lost job, nothing runs on the way out. SIGTERM: what schedulers and `kill` send; it must exit
# cleanly. (tests/test_stage.py checks the clean exits on SIGINT and SIGTERM for any stage; here SIGTERM runs once
# under dvc repro.)
# "@2": with compute.nproc 2 (torchrun); "launcher": SIGKILL to torchrun's agent alone, not the process group.
# After any SIGKILL no process of the run may be left 10 s later (its workers die with their launcher).
SIGNALS = {"database": ("SIGKILL",), "search": ("SIGKILL@2",), "finetune@searched": ("SIGKILL-launcher@2", "SIGTERM")}
KILL_CASES = [(*kill, sig) for kill in KILLS for sig in SIGNALS[kill[0]]]
# What a repo of this pipeline holds that starts with a dot; anything else with a dot (outside git's
# and DVC's own folders) is a temporary file or folder left behind by an interrupted writer.
OWN_HIDDEN = {".git", ".dvc", ".gitignore", ".dvcignore", ".darwinlm"}


def _leftover_temporaries(repo):
    hidden = [p for p in repo.rglob(".*") if p.relative_to(repo).parts[0] not in (".git", ".dvc")]
    return sorted(str(p.relative_to(repo)) for p in hidden if str(p.relative_to(repo)) not in OWN_HIDDEN)


def _run_processes(repo):
    """Every process working in `repo` (DVC, the stage, torchrun's agent and its workers)."""
    import psutil
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.cwd() == str(repo):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _gone_within(processes, seconds):
    import time

    import psutil
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
                return True
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.2)
    return False


def _stage_runs(repo, stage, status):
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                              f"tags.stage = '{stage}' and attributes.status = '{status}'")


@pytest.mark.parametrize("stage,edits,kill_at,result,message,sig", KILL_CASES, ids=[f"{k[0]}-{k[-1]}" for k in KILL_CASES])
def test_interrupted_stage_resumes_under_dvc_repro_to_the_uninterrupted_result(repo, stage, edits, kill_at, result,
                                                                                message, sig):
    import signal
    original = (repo / "params.yaml").read_text()
    try:
        for section, values in edits.items():
            _edit_params(repo, section, **values)
        if sig.endswith("@2"):  # another seed too: DVC's run cache must not hand this result to a 1-process case
            _edit_params(repo, "compute", nproc=2)
            _edit_params(repo, stage.split("@")[0], seed=1)
        _run(repo, "dvc", "repro", stage)  # the stage and what it needs: its uninterrupted result
        reference = (repo / result).read_bytes()
        killed_runs = len(_stage_runs(repo, stage, "KILLED"))
        shutil.rmtree(repo / ".darwinlm", ignore_errors=True)  # no finished work to reuse: really run it
        command = ["dvc", "repro", "--force", "--single-item", stage]
        process = subprocess.Popen(command, cwd=repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        seen, after = [], []
        for line in process.stdout:
            seen.append(line)
            if kill_at in line:
                run = _run_processes(repo)
                if sig.startswith("SIGKILL-launcher"):
                    os.kill(next(p.pid for p in run if "torchrun" in " ".join(p.cmdline())), signal.SIGKILL)
                else:
                    os.killpg(process.pid, getattr(signal, sig.split("@")[0]))
                break
        killed = sig.startswith("SIGKILL")
        if not killed:
            after = list(process.stdout)  # to the end: the stage has then finished cleaning up and exited
        process.wait()
        if killed:
            assert _gone_within(run, 10), [p.cmdline() for p in run if p.is_running()]
        assert any(kill_at in line for line in seen), "".join(seen)[-2000:]
        assert process.returncode != 0
        # Nothing that DVC would take as the stage's complete output: DVC removed the old one before
        # running the stage, and the stage writes its outputs only by renaming finished folders/files.
        assert not (repo / result).exists()
        assert stage in _stale(repo)
        if not killed:
            assert f"interrupted by {sig}: rerun `dvc repro` to resume\n" in after, "".join(after)[-2000:]
            assert not any("Traceback" in line for line in after), "".join(after)[-3000:]
            assert _leftover_temporaries(repo) == []
            assert len(_stage_runs(repo, stage, "KILLED")) == killed_runs + 1
        resumed = _run(repo, *command)  # the user runs the interrupted command again
        assert message in resumed.stdout, resumed.stdout[-2000:]
        assert (repo / result).read_bytes() == reference
        assert _leftover_temporaries(repo) == []
    finally:
        (repo / "params.yaml").write_text(original)
        _run(repo, "dvc", "repro")


def test_two_processes_run_the_whole_pipeline_to_the_same_result(repo):
    """compute.nproc: 2 relaunches database, search and finetune under torchrun (2 gloo processes)."""
    original = (repo / "params.yaml").read_text()
    one = {f: (repo / f).read_text() for f in ("levels/searched.json", "levels/uniform.json", "database/manifest.json")}
    one_model = load_file(repo / "models/pruned/model.safetensors")
    try:
        _edit_params(repo, "compute", nproc=2)
        assert _stale(repo) == set()  # how many processes is not a dependency: nothing to re-run
        log = _run(repo, "dvc", "repro", "--force").stdout
        assert "2 processes on cpu" in log
        assert (repo / "levels/searched.json").read_text() == one["levels/searched.json"]
        assert (repo / "levels/uniform.json").read_text() == one["levels/uniform.json"]
        two_manifest = json.loads((repo / "database/manifest.json").read_text())
        assert two_manifest["kept_units"] == json.loads(one["database/manifest.json"])["kept_units"]
        two_model = load_file(repo / "models/pruned/model.safetensors")
        for name, tensor in one_model.items():
            torch.testing.assert_close(two_model[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        _edit_params(repo, "compute", nproc=2, fsdp=True)  # sharded training gathers the same model
        assert "(FSDP)" in _run(repo, "dvc", "repro", "--force", "--single-item", "finetune@searched").stdout
        fsdp_model = load_file(repo / "models/pruned/model.safetensors")
        for name, tensor in one_model.items():
            torch.testing.assert_close(fsdp_model[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        (repo / "params.yaml").write_text(original)


def test_dvc_experiment_runs_and_shows_beside_the_baseline(repo):
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline results")
    _run(repo, "dvc", "exp", "run", "-n", "target60", "-S", "search.target=0.6")
    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json").stdout)
    rows = {}
    for baseline in shown:
        for entry in [baseline] + [e for exp in (baseline.get("experiments") or []) for e in exp["revs"]]:
            data = entry.get("data") or {}
            rows[entry.get("name") or entry["rev"]] = data
    targets = {name: d["params"]["params.yaml"]["data"]["search"]["target"] for name, d in rows.items()
               if d.get("params")}
    assert 0.6 in targets.values() and 0.5 in targets.values()
    exp_metrics = rows["target60"]["metrics"]["metrics/evaluate.json"]["data"]
    assert exp_metrics["params"]["pruned"] < _metrics(repo, "base")["parameters"]
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                              "tags.stage = 'evaluate'")
    assert {r.data.tags["dvc_experiment"] for r in runs} >= {"workspace", "target60"}
    assert {r.data.params["search.target"] for r in runs} == {"0.5", "0.6"}


def test_two_queued_experiments_run_concurrently_into_the_one_store(repo):
    import time
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "before the queue", check=False)
    for target in ("0.4", "0.7"):
        _run(repo, "dvc", "exp", "run", "--queue", "-n", f"q{target[-1]}", "-S", f"search.target={target}")
    _run(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = _run(repo, "dvc", "queue", "status").stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp_id = client.get_experiment_by_name("e2e").experiment_id
    for name, target in (("q4", "0.4"), ("q7", "0.7")):
        runs = client.search_runs([exp_id], f"tags.dvc_experiment = '{name}'")
        stages = {r.data.tags.get("stage") for r in runs}
        assert {"search", "uniform", "evaluate"} <= stages, (name, stages)
        assert all(r.info.status == "FINISHED" for r in runs)
        evaluate = next(r for r in runs if r.data.tags.get("stage") == "evaluate")
        assert evaluate.data.params["search.target"] == target
        assert evaluate.info.artifact_uri.startswith(f"file://{repo}/mlartifacts/")  # not the queue's temp copy
