"""Saving and loading pruned models as Hugging Face folders that carry their own modeling code."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.model import pruned_llama
from pipeline.model.pruned_llama import PrunedLlamaForCausalLM

MODELING_FILE = "pruned_llama.py"
AUTO_MAP = {"AutoConfig": "pruned_llama.PrunedLlamaConfig",
            "AutoModelForCausalLM": "pruned_llama.PrunedLlamaForCausalLM"}


def save_pruned(model: PrunedLlamaForCausalLM, tokenizer, folder: Path, card: str) -> None:
    folder = Path(folder)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(pruned_llama.__file__, folder / MODELING_FILE)
    (folder / "README.md").write_text(card)


def load_pruned(folder: Path) -> PrunedLlamaForCausalLM:
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"no pruned model at '{folder}': run the finetune stage (dvc repro)")
    return PrunedLlamaForCausalLM.from_pretrained(folder).eval()
