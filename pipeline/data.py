"""Text sources -> documents -> token windows -> the disjoint token sets of docs/method.md, section 1
(calib, fitness, train from `data.train`; eval from `data.eval`).

The validate stage counts tokens with the same functions the calibration stage tokenizes with
(`iter_documents` + `token_chunks`), so the two can never disagree about whether a corpus is big enough.
"""
from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from pipeline.config import DataParams, DatasetSpec, TextSource
from pipeline.errors import ConfigError, CorpusError
from pipeline.run.outputs import TOKENS

TRAIN_SETS = ("calib", "fitness", "train")
# The token budgets each text source must cover (keys of DataParams).
BUDGETS = {"train": tuple(f"{name}_tokens" for name in TRAIN_SETS), "eval": ("eval_tokens",)}
# Files are cut into documents of at most 64 lines and at most 64K characters (a longer line is cut
# too), so tokenizing a huge file, or a file that is one huge line, takes bounded memory and time.
_PIECE_LINES = 64
_PIECE_CHARS = 1 << 16
# Checked longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_documents(source: TextSource, demo_dir: Path | None = None, split: str = "train") -> list[str]:
    """Documents of a text source: 'demo' (the base stage's stdlib corpus), files, or a dataset."""
    return list(iter_documents(source, demo_dir, split))


def iter_documents(source: TextSource, demo_dir: Path | None = None, split: str = "train") -> Iterator[str]:
    """The documents of `read_documents`, read lazily, so a caller that stops early reads only that far.

    Files: UTF-8, or UTF-16/UTF-32/UTF-8 when they start with that byte-order mark; bytes that are not
    valid in the encoding become U+FFFD (a stray Latin-1 byte must not stop a run over a large corpus);
    CRLF and CR line ends become LF. Every file must hold some non-whitespace text: an empty file in
    the list is almost always a failed download or a wrong path, so it is refused by name up front.
    """
    if isinstance(source, DatasetSpec):
        yield from _dataset_documents(source)
        return
    files = [source] if isinstance(source, str) else list(source)
    if files == ["demo"]:
        with (Path(demo_dir) / f"{split}.jsonl").open(encoding="utf-8") as f:
            yield from (json.loads(line)["text"] for line in f if line.strip())
        return
    for f in files:
        _require_text(Path(f), f"data.{split}")
    for f in files:
        yield from _file_pieces(Path(f))


def text_encoding(head: bytes) -> str:
    """The codec for a file starting with `head`: the one its byte-order mark names, else UTF-8."""
    for mark, encoding in _BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return encoding
    return "utf-8"


def _open_text(path: Path):
    with path.open("rb") as f:
        head = f.read(4)
    # newline=None (universal newlines): CRLF and CR arrive as LF, as in any Python text file.
    return path.open(encoding=text_encoding(head), errors="replace", newline=None)


def _require_text(path: Path, source_key: str) -> None:
    """Refuse a file that is empty or whitespace only (reads only up to its first text)."""
    with _open_text(path) as f:
        for block in iter(lambda: f.read(1 << 20), ""):
            if not block.isspace():
                return
    size = path.stat().st_size
    what = "is empty (0 bytes)" if size == 0 else f"has no text ({size} bytes, all whitespace)"
    raise CorpusError(f"{source_key}: text file '{path}' {what}; remove it from {source_key} or give it text")


def _file_pieces(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        piece, size = [], 0
        for line in iter(lambda: f.readline(_PIECE_CHARS), ""):
            if piece and (len(piece) == _PIECE_LINES or size + len(line) > _PIECE_CHARS):
                yield "".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            yield "".join(piece)


def _dataset_documents(spec: DatasetSpec) -> Iterator[str]:
    import datasets

    dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files)
    if spec.text_field not in dataset.column_names:
        raise CorpusError(f"dataset '{spec.path}' has no field '{spec.text_field}' "
                          f"(fields: {', '.join(dataset.column_names)}); set text_field")
    if spec.max_documents is not None:
        dataset = dataset.select(range(min(spec.max_documents, len(dataset))))
    for rows in dataset.iter(batch_size=1000):
        for text in rows[spec.text_field]:
            if text is None:  # a row without text (common in scraped data): nothing to tokenize
                continue
            if not isinstance(text, str):
                raise CorpusError(f"dataset '{spec.path}' field '{spec.text_field}' holds "
                                  f"{type(text).__name__} values, not text; set text_field to a text column")
            yield text


def require_eos(tokenizer) -> None:
    """The token stream separates documents with EOS, so the tokenizer must have one. BOS is optional
    (Qwen2's tokenizer, for one, has none): it only marks where a document starts, which EOS already does."""
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"model.name_or_path '{name}': its tokenizer has no eos_token, which this pipeline puts between "
            "documents so that one text never runs on into the next; set one that is in its vocabulary (e.g. "
            f"\"eos_token\": \"</s>\" in {name}/tokenizer_config.json) or use a model whose tokenizer has one "
            "(a missing bos_token is fine)")


def token_chunks(documents: Iterable[str], tokenizer, batch: int = 256) -> Iterator[torch.Tensor]:
    """The token stream in consecutive pieces, one per `batch` documents: each document that is not
    blank becomes [BOS] + its ids + EOS (BOS only when the tokenizer has one)."""
    require_eos(tokenizer)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [tokenizer.eos_token_id]
    documents = iter(documents)
    while taken := list(itertools.islice(documents, batch)):
        texts = [d for d in taken if d.strip()]
        if texts:
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            yield torch.tensor([t for doc_ids in ids for t in bos + doc_ids + eos], dtype=torch.long)


def token_stream(documents: Iterable[str], tokenizer, batch: int = 256) -> torch.Tensor:
    """One long stream of token ids: the documents, each as [BOS] ids EOS."""
    chunks = list(token_chunks(documents, tokenizer, batch))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


def count_tokens(documents: Iterable[str], tokenizer, stop_at: int) -> int:
    """len(token_stream(documents, tokenizer)), but counting stops once it reaches `stop_at`, so
    checking a huge corpus against a budget reads and tokenizes only about the budget."""
    total = 0
    for chunk in token_chunks(documents, tokenizer):
        total += len(chunk)
        if total >= stop_at:
            break
    return total


def tokens_needed(p: DataParams, source: str) -> int:
    """Tokens the sets drawn from `data.<source>` take: each budget in whole windows of data.seq_len."""
    return sum(getattr(p, budget) // p.seq_len for budget in BUDGETS[source]) * p.seq_len


def check_enough_tokens(available: int, p: DataParams, source: str) -> None:
    """Raise CorpusError naming both numbers and the keys when `data.<source>` yields too few tokens."""
    needed = tokens_needed(p, source)
    if available == 0:
        raise CorpusError(f"data.{source} has no text (every document is empty or whitespace only)")
    if available < needed:
        several = len(BUDGETS[source]) > 1
        budgets = " + ".join(f"data.{budget}" for budget in BUDGETS[source])
        raise CorpusError(
            f"data.{source} yields {available} tokens ({available // p.seq_len} windows of data.seq_len={p.seq_len}) "
            f"but {budgets} need{'' if several else 's'} {needed} tokens ({needed // p.seq_len} windows); "
            f"give more text or lower {'those budgets' if several else budgets}")


def check_corpus_budgets(p: DataParams, tokenizer) -> dict[str, int]:
    """Before any stage runs: do data.train and data.eval hold enough tokens for the budgets?
    Returns the tokens counted per source (counting stops at what is needed)."""
    counted = {}
    for source in BUDGETS:
        counted[source] = count_tokens(iter_documents(getattr(p, source), split=source), tokenizer,
                                       stop_at=tokens_needed(p, source))
        check_enough_tokens(counted[source], p, source)
    return counted


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def split_train_sets(stream: torch.Tensor, p: DataParams) -> dict[str, torch.Tensor]:
    """Disjoint calib / fitness / train windows of the `data.train` stream, drawn once in a seeded random order."""
    check_enough_tokens(len(stream), p, "train")
    all_windows = windows(stream, p.seq_len)
    order = torch.randperm(len(all_windows), generator=torch.Generator().manual_seed(p.seed))
    sets, start = {}, 0
    for name in TRAIN_SETS:
        wanted = getattr(p, f"{name}_tokens") // p.seq_len
        sets[name] = all_windows[order[start:start + wanted]].clone()
        start += wanted
    return sets


def eval_set(stream: torch.Tensor, p: DataParams) -> torch.Tensor:
    """The first data.eval_tokens (in whole windows) of the `data.eval` stream."""
    check_enough_tokens(len(stream), p, "eval")
    return windows(stream, p.seq_len)[: p.eval_tokens // p.seq_len].clone()


def load_tokens(name: str) -> torch.Tensor:
    """One of the token sets the calibration stage saved (calib, fitness, train, eval)."""
    path = TOKENS / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"token set '{path}' not found: run the calibration stage (dvc repro)")
    return torch.load(path)
