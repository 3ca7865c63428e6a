"""What a stage will need in memory and on disk, printed before it starts, and a clear refusal
when the disk cannot hold its output (instead of dying hours later with a half-written file)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import ResourceError

GiB = 2**30


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def available_memory() -> int | None:
    """Bytes of RAM free now (Linux), None where unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: Path) -> int:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_disk(path: Path, need: int, what: str) -> None:
    free = free_disk(path)
    if need > free:
        raise ResourceError(f"{what} needs about {gib(need)} on the file system of '{path}', which has {gib(free)} "
                            "free: free some space (e.g. `dvc gc`, old .darwinlm/ work) or lower the sizes")


def training_bytes(parameters: int) -> int:
    """What training holds per parameter: fp32 master weights and gradients (a bf16/fp16 model trains
    on an fp32 copy: see pipeline/train.py) and AdamW's two fp32 moments."""
    return parameters * 16
