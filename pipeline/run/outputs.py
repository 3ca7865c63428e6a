"""Where each stage writes, and writing so that an interrupted stage never leaves a half output
that looks complete: everything goes to a temporary sibling first and is renamed into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

BASE = Path("base")
BASE_MODEL = BASE / "model"
DEMO_CORPUS = BASE / "corpus"
RESOLVED = BASE / "resolved.json"
TOKENS = Path("data/tokens")
DATABASE = Path("database")
LEVELS = Path("levels")
SEARCH_HISTORY = Path("search/history.csv")
SEARCH_STRUCTURE = Path("search/structure.csv")
# Work in progress lives outside DVC's outputs (DVC deletes those before running a stage), so a
# killed stage resumes from it.
SEARCH_CHECKPOINT = Path(".darwinlm/search_checkpoint.json")
DATABASE_WORK = Path(".darwinlm/database")
FINETUNE_WORK = Path(".darwinlm/finetune")
BASE_WORK = Path(".darwinlm/base")
BASELINES_WORK = Path(".darwinlm/baselines")
BASELINE_LEVELS = LEVELS / "baselines"  # one <baseline>.json of levels per baseline
BASELINE_PANEL = Path("plots/baselines.csv")  # one row per method: size, one-shot ppl, KL (dvc plots)
MODELS = {"searched": Path("models/pruned"), "uniform": Path("models/uniform")}
GGUF = Path("models/gguf")  # llama.cpp files: <dense|searched|uniform>-<type>.gguf
SIZE = Path("size")  # file-size budgets: size/dense (importance, dense f16 and presets), size/<budget> (searches)
SIZE_DENSE = SIZE / "dense"
SIZE_IMPORTANCE = SIZE_DENSE / "importance.safetensors"  # llama.cpp-style imatrix of the dense model
SIZE_WORK = Path(".darwinlm/size")  # byte searches' checkpoints
SIZE_PANEL = Path("plots/size_panel.csv")  # one row per file: bytes, KL to dense f16, ... (dvc plots)
METRICS = Path("metrics")
PLOTS = Path("plots")


def metrics_path(stage: str) -> Path:
    return METRICS / f"{stage.replace('@', '_')}.json"


def levels_path(name: str) -> Path:
    return LEVELS / f"{name}.json"


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary folder; on success it replaces `path` in one rename. On an exception
    (an interrupted stage included) the temporary folder is removed; temporary folders of earlier
    writers of `path` that were killed outright (SIGKILL) are removed on the next call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in leftover_temporaries(path):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_dir_into_place(tmp, path)


def leftover_temporaries(path: Path) -> list[Path]:
    """What `atomic_dir(path)` / `move_dir_into_place` leave beside `path` when killed mid-way."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f".{path.name}.*") if p.is_dir())


def move_dir_into_place(source: Path, path: Path) -> None:
    """Rename a finished folder onto `path` (same file system), replacing what was there."""
    path = Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(source, path)  # right after the first rename: `path` is missing for the shortest time
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, path)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, so a kill
    mid-write leaves the previous file (and an interruption leaves no temporary file either)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found: run the stage that produces it (dvc repro)")
    return json.loads(path.read_text())
