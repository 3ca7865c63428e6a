"""The validate stage on a real (local, tiny) model: its tokenizer must separate documents with EOS
(BOS optional), and data.train / data.eval must cover the token budgets, all before any stage runs."""
import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, byte_level_tokenizer, shipped, tiny_llama

from pipeline.config import ConfigError, load_params
from pipeline.data import CorpusError
from pipeline.model.resolve import check_real_model

BUDGETS = dict(seq_len=16, calib_tokens=64, fitness_tokens=32, train_tokens=32, eval_tokens=32)  # 128 + 32 tokens
TEXT = "def f(x):\n    return x + 1\nhello world, some text\n"


def _model_folder(path, **specials):
    tokenizer = byte_level_tokenizer(**specials)
    tiny_llama(vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"full": _model_folder(root / "full"), "no_eos": _model_folder(root / "no_eos", eos=None),
            "no_bos": _model_folder(root / "no_bos", bos=None)}


def _params_file(tmp_path, model, train_text=TEXT * 40, eval_text=TEXT * 10):
    (tmp_path / "train.txt").write_text(train_text)
    (tmp_path / "eval.txt").write_text(eval_text)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())  # the one source of the other values
    raw["model"]["name_or_path"] = model
    raw["data"].update(train=str(tmp_path / "train.txt"), eval=str(tmp_path / "eval.txt"), **BUDGETS)
    raw["search"]["schedule"] = [{"survivors": 1, "fitness_tokens": 32, "train_tokens": 16}]
    raw["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def test_a_model_whose_corpora_cover_the_budgets_passes(tmp_path, folders):
    counted = check_real_model(load_params(_params_file(tmp_path, folders["full"])))
    assert counted["train"] >= 128 and counted["eval"] >= 32


def test_a_tokenizer_without_bos_is_fine(tmp_path, folders):
    counted = check_real_model(load_params(_params_file(tmp_path, folders["no_bos"])))
    assert counted["train"] >= 128


def test_a_tokenizer_without_eos_is_refused_naming_the_model(tmp_path, folders):
    with pytest.raises(ConfigError, match=rf"^model.name_or_path '{folders['no_eos']}': its tokenizer has no "
                                          r"eos_token"):
        check_real_model(load_params(_params_file(tmp_path, folders["no_eos"])))


def test_too_little_text_is_refused_with_both_numbers_and_the_keys(tmp_path, folders):
    with pytest.raises(CorpusError, match=r"^data.train yields \d+ tokens \(\d windows of data.seq_len=16\) but "
                                          r"data.calib_tokens \+ data.fitness_tokens \+ data.train_tokens need 128 "
                                          r"tokens \(8 windows\)"):
        check_real_model(load_params(_params_file(tmp_path, folders["full"], train_text=TEXT)))
    with pytest.raises(CorpusError, match=r"^data.eval yields \d+ tokens .* but data.eval_tokens needs 32 tokens"):
        check_real_model(load_params(_params_file(tmp_path, folders["full"], eval_text="hi\n")))
    with pytest.raises(CorpusError, match=rf"^data.train: text file '{tmp_path / 'train.txt'}' has no text"):
        check_real_model(load_params(_params_file(tmp_path, folders["full"], train_text="\n\n  \n")))


@pytest.mark.parametrize("case", ["no_eos", "too_little_text"])
def test_the_validate_stage_stops_with_one_line_and_writes_nothing(tmp_path, folders, case):
    model = folders["no_eos" if case == "no_eos" else "full"]
    _params_file(tmp_path, model, train_text=TEXT * (40 if case == "no_eos" else 1))
    result = subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    expected = "its tokenizer has no eos_token" if case == "no_eos" else "data.train yields"
    assert result.stderr.startswith("error in params.yaml: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no traceback
    assert not (tmp_path / "checks").exists()


def test_corpus_fingerprint_follows_the_text_not_the_name(tmp_path):
    from pipeline.config import DatasetSpec
    from pipeline.model.resolve import corpus_fingerprint
    text = tmp_path / "train.txt"
    text.write_text("one document\n")
    before = corpus_fingerprint(str(text))
    assert corpus_fingerprint([str(text)]) == before
    text.write_text("one document, edited in place\n")
    assert corpus_fingerprint(str(text)) != before  # so calibration re-runs
    assert corpus_fingerprint("demo") == "demo"
    assert corpus_fingerprint(DatasetSpec(path="wikitext", data_files="a.parquet"))["data_files"] == "a.parquet"


def test_compute_asks_for_no_more_gpus_than_there_are(monkeypatch):
    import torch

    from pipeline.model.resolve import check_compute

    def compute(**changes):
        return shipped(compute=shipped("compute", **changes))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_compute(compute(nproc=2))
    with pytest.raises(ConfigError, match="compute.nproc is 4 but this machine has 2 GPUs"):
        check_compute(compute(nproc=4))
    check_compute(compute(nproc=4, device="cpu"))  # gloo processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="compute.device is 'cuda' but torch sees no GPU"):
        check_compute(compute(device="cuda"))
