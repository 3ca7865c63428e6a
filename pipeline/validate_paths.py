"""The params checks that look at the file system: the model folder, the text files and the
lm-eval task folder exist. Run by the validate stage only, so loading params reads nothing but params.yaml."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import ConfigError, DatasetSpec, Params


def check_paths(params: Params) -> None:
    """Raises ConfigError naming the key whose folder or file is missing."""
    name = params.model.name_or_path
    if _looks_like_path(name) and not Path(name).is_dir():
        raise ConfigError(f"model.name_or_path: folder '{name}' does not exist "
                          "(give 'demo', a Hugging Face hub id such as 'meta-llama/Llama-3.1-8B', "
                          "or an existing folder)")
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: folder '{name}' has no config.json "
                          "(it must be a Hugging Face model folder)")
    for key in ("train", "eval"):
        source = getattr(params.data, key)
        files = [] if isinstance(source, DatasetSpec) or source == "demo" else [source] if isinstance(source, str) \
            else source
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"data.{key}: text file '{f}' not found (give 'demo', existing text files, "
                                  "or a dataset {path, name, split, text_field})")
    include = params.evaluate.lm_eval_include_path
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"evaluate.lm_eval_include_path: folder '{include}' does not exist")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and Path(name).exists()
