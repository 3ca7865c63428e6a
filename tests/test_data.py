"""Token sets: disjoint, seeded, and clear errors when the corpus is too small."""
import pytest
import torch

from pipeline.config import DataParams
from pipeline.data import CorpusError, eval_set, read_documents, split_train_sets, token_stream


def _params(**kw):
    base = dict(seq_len=8, calib_tokens=64, fitness_tokens=32, train_tokens=80, eval_tokens=16, seed=0)
    base.update(kw)
    return DataParams(**base)


def test_train_sets_are_disjoint_windows_of_the_stream_and_seeded():
    stream = torch.arange(1000)  # every window has distinct tokens, so overlap would show
    sets = split_train_sets(stream, _params())
    assert {k: tuple(v.shape) for k, v in sets.items()} == {"calib": (8, 8), "fitness": (4, 8), "train": (10, 8)}
    starts = [int(w[0]) for v in sets.values() for w in v]
    assert len(set(starts)) == len(starts) and all(s % 8 == 0 for s in starts)
    for v in sets.values():
        assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 8)) for w in v)
    again = split_train_sets(stream, _params())
    other = split_train_sets(stream, _params(seed=1))
    assert all(torch.equal(sets[k], again[k]) for k in sets)
    assert not torch.equal(sets["calib"], other["calib"])


def test_too_small_corpus_names_both_numbers():
    with pytest.raises(CorpusError, match=r"yields 100 tokens \(12 windows.*need 176 tokens"):
        split_train_sets(torch.arange(100), _params())
    with pytest.raises(CorpusError, match="data.eval_tokens asks for 16"):
        eval_set(torch.arange(10), _params())


class _CharTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[3 + (ord(c) % 50) for c in t] for t in texts]}


def test_files_with_odd_bytes_long_lines_and_blank_documents(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_bytes(b"caf\xe9 \x00\x07 ok\n\n\n" + b"x" * 50_000 + b"\n" + b"line\n" * 200)
    docs = read_documents(str(path))
    assert "".join(docs) == path.read_bytes().decode("utf-8", errors="replace")
    stream = token_stream(docs + ["   \n"], _CharTokenizer())
    assert int((stream == 1).sum()) == len([d for d in docs if d.strip()])  # blank documents are skipped
