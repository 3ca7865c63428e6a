"""params.yaml validation: every class of bad input names the key and what is valid."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.model.resolve import check_paths

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, edit):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", ["params.yaml", *sorted(p.relative_to(ROOT).as_posix()
                                                     for p in (ROOT / "configs").glob("*.yaml"))])
def test_shipped_params_and_presets_are_valid_and_touch_no_files(path):
    params = load_params(ROOT / path)  # params.yaml and the presets are the one source of values
    assert params.search.schedule[-1].survivors == 1 and isinstance(params.search.train_lr, float)


def test_every_required_key_must_be_given(tmp_path):
    with pytest.raises(ConfigError, match=_escape("missing key 'search.target'")):
        load_params(_write(tmp_path, lambda r: r["search"].pop("target")))
    with pytest.raises(ConfigError, match=_escape("missing key 'compute'")):
        load_params(_write(tmp_path, lambda r: r.pop("compute")))
    with pytest.raises(ConfigError, match=_escape("missing key 'size'")):  # dvc.yaml could not even be read
        load_params(_write(tmp_path, lambda r: r.pop("size")))


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["search"].update(targt=0.5), "unknown key 'search.targt'; valid keys in search: target, generations,"),
    (lambda r: r.update(serach={}), "unknown key 'serach'; valid keys: model, demo, data,"),
    (lambda r: r["search"].update(target=1.5), "search.target is 1.5: Input should be less than 1"),
    (lambda r: r["search"].update(target=0), "search.target is 0: Input should be greater than 0"),
    (lambda r: r["search"].update(target="half"), "search.target is 'half': Input should be a valid number"),
    (lambda r: r["search"].update(generations=2.5), "search.generations is 2.5: Input should be a valid integer"),
    (lambda r: r["tracking"].update(enabled="yes"), "tracking.enabled is 'yes': Input should be a valid boolean"),
    (lambda r: r["model"].update(dtype="float8"), "model.dtype is 'float8': Input should be 'float32', 'bfloat16' or 'float16'"),
    (lambda r: r["search"].update(generations=True), "search.generations is True: Input should be a valid integer"),
    (lambda r: r["tracking"].update(enabled=1), "tracking.enabled is 1: Input should be a valid boolean"),
    (lambda r: r["data"].update(train=[]), "data.train is []: give 'demo' or text files"),
    (lambda r: r["data"].update(eval={"path": "x", "colour": 1}), "unknown key 'data.eval.colour'; valid keys in data.eval: path, name, split,"),
    (lambda r: r["database"].update(levels=1), "database.levels is 1: Input should be greater than or equal to 2"),
    (lambda r: r["search"].update(schedule=[]), "search.schedule is []: give at least one stage {survivors, fitness_tokens, train_tokens}"),
    (lambda r: r["search"].update(schedule=[{"survivors": 1}]), "missing key 'search.schedule[0].fitness_tokens'"),
    (lambda r: r["search"].update(schedule=[{"survivors": 1, "fitness_tokens": 8, "x": 1}]),
     "unknown key 'search.schedule[0].x'; valid keys in search.schedule[0]: survivors, fitness_tokens, train_tokens"),
    (lambda r: r["search"].update(schedule=[{"survivors": 4, "fitness_tokens": 8},
                                            {"survivors": 8, "fitness_tokens": 8}]), "survivors must shrink"),
    (lambda r: r["search"].update(schedule=[{"survivors": 2, "fitness_tokens": 8}]), "must keep exactly 1"),
    (lambda r: r["search"].update(schedule=[{"survivors": 1, "fitness_tokens": 10**9}]),
     "exceeds data.fitness_tokens"),
    (lambda r: r["search"].update(schedule=[{"survivors": 4, "fitness_tokens": 8},
                                            {"survivors": 0, "fitness_tokens": 8}]), "search.schedule[1].survivors is 0: Input should be greater than 0"),
    (lambda r: r["finetune"].update(distill=2), "finetune.distill is 2: Input should be less than or equal to 1"),
    (lambda r: r["finetune"].update(stepz=3), "unknown key 'finetune.stepz'; valid keys in finetune: steps, batch_size,"),
    (lambda r: r["data"].update(eval={"path": " "}), "data.eval.path is ' ': give a hub dataset id or a local dataset folder"),
    (lambda r: r["database"].update(damp=1), "database.damp is 1: Input should be less than 1"),
    (lambda r: r["evaluate"].update(lm_eval_limit=0), "evaluate.lm_eval_limit is 0: Input should be greater than 0"),
    (lambda r: r["evaluate"].update(baselines=["flap", "sparsegpt"]), "evaluate.baselines[1] is 'sparsegpt': Input should be 'uniform_magnitude', 'wanda_sp', 'flap', 'cfsp', 'minitron', 'ziplm' or 'shortgpt'"),
    (lambda r: r["evaluate"].update(baselines=["flap", "flap"]), "evaluate.baselines is ['flap', 'flap']: repeats flap; give each once"),
    (lambda r: r["evaluate"].update(baselines=["flap"], finetune_baselines=["cfsp"]),
     "evaluate.finetune_baselines lists cfsp, which evaluate.baselines does not build (flap)"),
    (lambda r: r["database"].update(method="wanda"), "database.method is 'wanda': Input should be 'obs', 'magnitude', 'wanda_sp' or 'flap'"),
    (lambda r: r["compute"].update(nproc=3), "finetune.batch_size (8) must be divisible by compute.nproc (3)"),
    (lambda r: r["data"].update(seq_len=4096), "exceeds the demo model's context"),
    (lambda r: r["compute"].update(threads=0), "compute.threads is 0: Input should be greater than 0"),
    (lambda r: r["model"].update(name_or_path="org/model"), "data.train is 'demo' but model.name_or_path"),
    (lambda r: r["export"].update(gguf_types=["q3"]), "export.gguf_types[0] is 'q3': Input should be 'f32', 'f16', 'q8_0'"),
    (lambda r: r["export"].update(gguf_types=[]), "export.gguf_types is []: give GGUF types, e.g. [f16, q8_0]"),
    (lambda r: r["export"].update(gguf_types=["f16", "f16"]), "export.gguf_types is ['f16', 'f16']: repeats f16; give each once"),
    (lambda r: (r["export"].update(gguf_types=["f16"]), r["evaluate"].update(speed_gguf_type="q8_0")),
     "evaluate.speed_gguf_type is 'q8_0' but export.gguf_types (f16)"),
    (lambda r: r["size"].update(budgets=["q4_k_m", "75 parsecs"]),
     "size.budgets is ['q4_k_m', '75 parsecs']: '75 parsecs': give bytes (e.g. 80000000 or '75MB' / '72MiB')"),
    (lambda r: r["size"].update(budgets=[1.5]), "a fraction of the dense f16 file between 0 and 1"),
    (lambda r: r["size"].update(quant_types=["q8_0", "q7_k"]), "size.quant_types[1] is 'q7_k': Input should be"),
    (lambda r: r["size"].update(rows=["joint", "joint"]), "size.rows is ['joint', 'joint']: repeats joint"),
    (lambda r: r["size"].update(schedule=[{"survivors": 2, "fitness_tokens": 8}]),
     "size.schedule[-1].survivors is 2: the last stage must keep exactly 1"),
    (lambda r: r["size"].update(budgets=["q4_k_m"], eval_windows=10**6), "size.eval_windows (1000000) x data.seq_len"),
])
def test_bad_params_are_refused_with_the_key_named(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=_escape(message)):
        load_params(_write(tmp_path, edit))


def _escape(text):
    import re
    return re.escape(text)


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read: No such file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "p.yaml").write_text("search: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "p.yaml")


def test_dataset_spec_and_file_lists_parse(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    params = load_params(_write(tmp_path, lambda r: r["data"].update(
        train=[str(text), str(text)], eval={"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"})))
    assert params.data.train == [str(text), str(text)]
    assert params.data.eval.name == "wikitext-2-raw-v1" and params.data.eval.text_field == "text"
    assert params.model_dump()["data"]["eval"]["split"] == "test"


@pytest.mark.parametrize("edit,message", [
    (lambda r: (r["model"].update(name_or_path="./no/such/folder"), r["data"].update(train=__file__, eval=__file__)),
     "folder './no/such/folder' does not exist"),
    (lambda r: r["data"].update(train="/no/such/file.txt"), "data.train: text file '/no/such/file.txt' not found"),
    (lambda r: r["evaluate"].update(lm_eval_include_path="/no/such/tasks"), "folder '/no/such/tasks' does not exist"),
])
def test_missing_files_are_refused_by_the_path_checks_not_by_loading(tmp_path, edit, message):
    params = load_params(_write(tmp_path, edit))  # loading reads params.yaml only
    with pytest.raises(ConfigError, match=_escape(message)):
        check_paths(params)


def test_a_model_folder_needs_a_config_json(tmp_path):
    (tmp_path / "model").mkdir()
    params = load_params(_write(tmp_path, lambda r: (r["model"].update(name_or_path=str(tmp_path / "model")),
                                                     r["data"].update(train=__file__, eval=__file__))))
    with pytest.raises(ConfigError, match="has no config.json"):
        check_paths(params)
    (tmp_path / "model" / "config.json").write_text("{}")
    check_paths(params)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    params = load_params(_write(tmp_path, lambda r: r["search"].update(train_lr="1e-5")))
    assert params.search.train_lr == 1e-5


def test_checks_against_the_model_shape(tmp_path):
    from pipeline.model.resolve import check_params_against_model
    params = load_params(_write(tmp_path, lambda r: r["data"].update(seq_len=128)))
    check_params_against_model(params, 4, 128)
    with pytest.raises(ConfigError, match=r"data.seq_len \(128\) exceeds the model's context"):
        check_params_against_model(params, 4, 64)
    tiny = load_params(_write(tmp_path, lambda r: r["search"].update(target=0.01)))
    with pytest.raises(ConfigError, match="rounds to no level removed"):
        check_params_against_model(tiny, 4, 128)
    huge = load_params(_write(tmp_path, lambda r: r["search"].update(target=0.99)))
    with pytest.raises(ConfigError, match="rounds to every module removed"):
        check_params_against_model(huge, 4, 128)


def test_unresolvable_model_id_is_a_clear_error_offline(monkeypatch):
    from pipeline.config import ModelParams
    from pipeline.model.resolve import describe_model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="model.name_or_path 'no-such-org/no-such-model' cannot be resolved"):
        describe_model(ModelParams(name_or_path="no-such-org/no-such-model", dtype="float32"))
