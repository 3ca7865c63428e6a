"""Text sources -> documents -> token windows -> the disjoint token sets of DESIGN.md 2.1
(calib, fitness, train from `data.train`; eval from `data.eval`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import DataParams, DatasetSpec, TextSource

TRAIN_SETS = ("calib", "fitness", "train")
_PIECE_LINES = 64  # tokenize files in pieces of lines: bounded memory and time on huge lines/files


class CorpusError(ValueError):
    """A corpus that cannot provide what the params ask for."""


def read_documents(source: TextSource, demo_dir: Path | None = None, split: str = "train") -> list[str]:
    """Documents of a text source: 'demo' (the base stage's stdlib corpus), files, or a dataset."""
    if isinstance(source, DatasetSpec):
        return _dataset_documents(source)
    files = [source] if isinstance(source, str) else list(source)
    if files == ["demo"]:
        path = Path(demo_dir) / f"{split}.jsonl"
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    documents = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        documents += ["".join(lines[i:i + _PIECE_LINES]) for i in range(0, len(lines), _PIECE_LINES)]
    return documents


def _dataset_documents(spec: DatasetSpec) -> list[str]:
    import datasets

    dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files)
    if spec.text_field not in dataset.column_names:
        raise CorpusError(f"dataset '{spec.path}' has no field '{spec.text_field}' "
                          f"(fields: {', '.join(dataset.column_names)}); set text_field")
    if spec.max_documents is not None:
        dataset = dataset.select(range(min(spec.max_documents, len(dataset))))
    return list(dataset[spec.text_field])


def token_stream(documents: list[str], tokenizer, batch: int = 256) -> torch.Tensor:
    """One long stream of token ids, documents separated by EOS (BOS before each when the tokenizer has one)."""
    ids: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for start in range(0, len(documents), batch):
        chunk = [d for d in documents[start:start + batch] if d.strip()]
        if not chunk:
            continue
        for doc_ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            ids += ([bos] if bos is not None else []) + doc_ids + ([eos] if eos is not None else [])
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def split_train_sets(stream: torch.Tensor, p: DataParams, source_name: str = "data.train") -> dict[str, torch.Tensor]:
    """Disjoint calib / fitness / train windows, drawn once in a seeded random order."""
    all_windows = windows(stream, p.seq_len)
    wanted = {name: getattr(p, f"{name}_tokens") // p.seq_len for name in TRAIN_SETS}
    needed = sum(wanted.values())
    if len(all_windows) < needed:
        raise CorpusError(
            f"{source_name} yields {len(stream)} tokens ({len(all_windows)} windows of data.seq_len={p.seq_len}) "
            f"but data.calib_tokens + data.fitness_tokens + data.train_tokens need {needed * p.seq_len} tokens "
            f"({needed} windows); give more text or lower those budgets")
    order = torch.randperm(len(all_windows), generator=torch.Generator().manual_seed(p.seed))
    sets, start = {}, 0
    for name in TRAIN_SETS:
        sets[name] = all_windows[order[start:start + wanted[name]]].clone()
        start += wanted[name]
    return sets


def eval_set(stream: torch.Tensor, p: DataParams, source_name: str = "data.eval") -> torch.Tensor:
    all_windows = windows(stream, p.seq_len)
    wanted = p.eval_tokens // p.seq_len
    if len(all_windows) < wanted:
        raise CorpusError(f"{source_name} yields {len(stream)} tokens ({len(all_windows)} windows of "
                          f"data.seq_len={p.seq_len}) but data.eval_tokens asks for {wanted * p.seq_len}; "
                          "give more text or lower data.eval_tokens")
    return all_windows[:wanted].clone()
