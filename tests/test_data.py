"""Token sets: disjoint, seeded, and clear errors when the corpus is too small; hostile text files
(odd encodings, control characters, huge lines, empty files); tokenizers without EOS or BOS."""
import codecs

import pytest
import torch
from helpers import byte_level_tokenizer, shipped

from pipeline.config import ConfigError, DatasetSpec
from pipeline.data import (
    _PIECE_CHARS,
    _PIECE_LINES,
    CorpusError,
    check_corpus_budgets,
    check_enough_tokens,
    count_tokens,
    eval_set,
    read_documents,
    split_train_sets,
    token_stream,
)


def _params(**kw):
    base = dict(seq_len=8, calib_tokens=64, fitness_tokens=32, train_tokens=80, eval_tokens=16, seed=0)
    base.update(kw)
    return shipped("data", **base)


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


def test_too_small_corpus_names_both_numbers_and_the_keys():
    with pytest.raises(CorpusError, match=r"^data.train yields 100 tokens \(12 windows of data.seq_len=8\) but "
                                          r"data.calib_tokens \+ data.fitness_tokens \+ data.train_tokens need "
                                          r"176 tokens \(22 windows\)"):
        split_train_sets(torch.arange(100), _params())
    with pytest.raises(CorpusError, match=r"^data.eval yields 10 tokens .* but data.eval_tokens needs 16 tokens"):
        eval_set(torch.arange(10), _params())
    with pytest.raises(CorpusError, match=r"^data.eval has no text \(every document is empty or whitespace only\)"):
        check_enough_tokens(0, _params(), "eval")


class _CharTokenizer:
    """One token per character: token counts are easy to predict."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[3 + (ord(c) % 50) for c in t] for t in texts]}


def _write(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_latin1_bytes_become_replacement_characters_and_the_rest_is_kept(tmp_path):
    path = _write(tmp_path, "latin1.txt", "café crème\nnaïve\n".encode("latin-1"))
    assert read_documents(path) == ["caf\ufffd cr\ufffdme\nna\ufffdve\n"]


@pytest.mark.parametrize("encoding,mark", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                           ("utf-8", codecs.BOM_UTF8), ("utf-32-le", codecs.BOM_UTF32_LE)])
def test_files_with_a_byte_order_mark_are_decoded_by_it(tmp_path, encoding, mark):
    text = "héllo wörld\n日本語 🙂\n"
    path = _write(tmp_path, "bom.txt", mark + text.encode(encoding))
    assert read_documents(path) == [text]  # the mark itself is not text


def test_nul_and_control_characters_reach_the_tokens_unchanged(tmp_path):
    text = "a\x00b\x01c\x07\x1b[0m\x7f\x0b\x0c\u200b end\n"
    documents = read_documents(_write(tmp_path, "control.txt", text.encode()))
    assert documents == [text]
    tokenizer = byte_level_tokenizer()
    stream = token_stream(documents, tokenizer).tolist()
    assert stream[0] == tokenizer.bos_token_id and stream[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(stream[1:-1]) == text


def test_crlf_and_lone_cr_line_ends_become_lf(tmp_path):
    documents = read_documents(_write(tmp_path, "crlf.txt", b"one\r\ntwo\rthree\r\n"))
    assert documents == ["one\ntwo\nthree\n"]


def test_blank_lines_are_kept_inside_documents_and_blank_documents_are_skipped(tmp_path):
    path = _write(tmp_path, "blank.txt", b"\n" * (2 * _PIECE_LINES) + b"text\n\n\nmore\n")
    documents = read_documents(path)
    assert documents == ["\n" * _PIECE_LINES] * 2 + ["text\n\n\nmore\n"]
    stream = token_stream(documents, _CharTokenizer())
    assert stream.tolist() == [1] + [3 + ord(c) % 50 for c in "text\n\n\nmore\n"] + [2]  # one document, no empty ones


def test_a_huge_line_without_newlines_is_cut_into_bounded_documents(tmp_path):
    data = b"0123456789abcdef" * (5 * 2**20 // 16)  # one 5 MiB line, no newline at all
    documents = read_documents(_write(tmp_path, "one_line.txt", data))
    assert "".join(documents) == data.decode()
    assert max(len(d) for d in documents) == _PIECE_CHARS and len(documents) == len(data) // _PIECE_CHARS
    # Lines that fit are never cut: a piece ends before a line that would overflow it.
    documents = read_documents(_write(tmp_path, "mixed.txt", b"short\n" + data[:_PIECE_CHARS - 1] + b"\nend\n"))
    assert documents == ["short\n", data[:_PIECE_CHARS - 1].decode() + "\n", "end\n"]


@pytest.mark.parametrize("data,what", [(b"", r"is empty \(0 bytes\)"), (b" \n\r\n\t\n", r"has no text \(6 bytes, all whitespace\)"),
                                       (codecs.BOM_UTF8, r"has no text \(3 bytes")])
def test_a_file_without_text_is_refused_by_name(tmp_path, data, what):
    good = _write(tmp_path, "good.txt", b"some text\n")
    bad = _write(tmp_path, "bad.txt", data)
    for source in (bad, [good, bad]):  # alone or among good files: a listed file with no text is a mistake
        with pytest.raises(CorpusError, match=rf"^data.eval: text file '{bad}' {what}"):
            read_documents(source, split="eval")


def test_counting_stops_at_the_budget_without_reading_further():
    consumed = []

    def documents():
        for i in range(100_000):
            consumed.append(i)
            yield "x" * 100
    assert count_tokens(documents(), _CharTokenizer(), stop_at=1000) >= 1000
    assert len(consumed) <= 256 + 1  # one batch of documents, not the corpus
    docs = ["abc", " ", "de\n"]
    assert count_tokens(docs, _CharTokenizer(), stop_at=10**9) == len(token_stream(docs, _CharTokenizer())) == 10


@pytest.mark.parametrize("lines", [17, 18, 19])  # 18 lines give exactly the 128 tokens needed
def test_validate_and_calibration_agree_on_the_corpus_size(tmp_path, lines):
    path = _write(tmp_path, "corpus.txt", b"abcdef\n" * lines)  # one document: BOS + 7 * lines + EOS tokens
    p = _params(train=path, eval=path, seq_len=8, calib_tokens=64, fitness_tokens=32, train_tokens=32, eval_tokens=16)
    at_validate = at_calibration = None
    try:
        check_corpus_budgets(p, _CharTokenizer())
    except CorpusError as err:
        at_validate = str(err)
    try:
        split_train_sets(token_stream(read_documents(p.train), _CharTokenizer()), p)
    except CorpusError as err:
        at_calibration = str(err)
    assert at_validate == at_calibration
    assert (at_validate is None) == (lines >= 18)
    if lines == 17:
        assert at_validate.startswith("data.train yields 121 tokens (15 windows of data.seq_len=8) but ")


def test_a_tokenizer_without_eos_is_refused_and_bos_is_optional():
    with pytest.raises(ConfigError, match=r"^model.name_or_path '.*': its tokenizer has no eos_token, .*"
                                          r"\(a missing bos_token is fine\)"):
        token_stream(["some text"], byte_level_tokenizer(eos=None))
    no_bos = byte_level_tokenizer(bos=None)
    stream = token_stream(["hello", "", "world"], no_bos).tolist()
    eos = no_bos.eos_token_id
    assert stream.count(eos) == 2 and stream[-1] == eos
    assert no_bos.decode(stream[:stream.index(eos)]) == "hello"
    assert no_bos.decode(stream[stream.index(eos) + 1:-1]) == "world"


def test_dataset_rows_without_text_are_skipped_and_non_text_fields_refused(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep the user's cache clean
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "first", "n": 1}\n{"text": null, "n": 2}\n{"text": "second", "n": 3}\n')
    assert read_documents(DatasetSpec(path=str(folder))) == ["first", "second"]
    assert read_documents(DatasetSpec(path=str(folder), max_documents=1)) == ["first"]
    with pytest.raises(CorpusError, match=rf"^dataset '{folder}' field 'n' holds int values, not text"):
        read_documents(DatasetSpec(path=str(folder), text_field="n"))
