"""What a real `model.name_or_path` resolves to, checked without loading its weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ConfigError, DatasetSpec, ModelParams, Params, TextSource
from pipeline.data import check_corpus_budgets, require_eos
from pipeline.distributed import pick_device, torchrun_path
from pipeline.modeling import count_params, structure_of
from pipeline.outputs import file_sha256


def describe_model(p: ModelParams) -> dict:
    """Identity (hub id + revision, or folder + content hash), architecture and size; refuses
    models without the Llama block layout before anything is downloaded or loaded."""
    try:
        config = AutoConfig.from_pretrained(p.name_or_path, revision=p.revision)
    except OSError as err:
        raise ConfigError(f"model.name_or_path '{p.name_or_path}' cannot be resolved: {err}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    structure = structure_of(skeleton)
    folder = Path(p.name_or_path)
    identity = {"kind": "folder", "folder_sha256": folder_hash(folder)} if folder.is_dir() else \
        {"kind": "hub", "revision": p.revision or "main"}
    return {"name_or_path": p.name_or_path, **identity, "model_type": config.model_type,
            "parameters": count_params(skeleton), "structure": structure.__dict__,
            "context": getattr(config, "max_position_embeddings", None)}


def check_params_against_model(params, num_layers: int, context: int | None) -> None:
    """Cross-checks that need the model's shape: sequence length vs context, target vs levels."""
    if context is not None and params.data.seq_len > context:
        raise ConfigError(f"data.seq_len ({params.data.seq_len}) exceeds the model's context "
                          f"(max_position_embeddings = {context})")
    levels, target = params.database.levels, params.search.target
    if round(target * levels * num_layers) == 0:
        raise ConfigError(f"search.target {target} with database.levels {levels} over {num_layers} layers rounds "
                          "to no level removed at all: raise search.target or database.levels")


def check_real_model(params: Params) -> dict[str, int]:
    """What the validate stage checks for a real model before any stage runs: the model resolves and
    fits the params, its tokenizer can separate documents, and data.train / data.eval cover the
    token budgets (counted exactly as the calibration stage will tokenize them). Returns the tokens
    counted per source."""
    info = describe_model(params.model)
    check_params_against_model(params, info["structure"]["num_layers"], info["context"])
    tokenizer = load_tokenizer(params.model)
    require_eos(tokenizer)
    return check_corpus_budgets(params.data, tokenizer)


def load_tokenizer(p: ModelParams):
    """The model's tokenizer, loaded as the later stages load it (`modeling.load_dense`)."""
    try:
        return AutoTokenizer.from_pretrained(p.name_or_path, revision=p.revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path '{p.name_or_path}': its tokenizer cannot be loaded: {err}") from None


def folder_hash(folder: Path) -> str:
    """sha256 over the relative names and contents of every file in the folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def corpus_fingerprint(source: TextSource) -> str | dict:
    """What the calibration stage's token sets depend on besides params: the contents of text files
    (so editing a corpus in place re-runs calibration), a dataset's spec, or the demo corpus (which
    the base stage's output already covers)."""
    if isinstance(source, DatasetSpec):
        return source.model_dump()
    files = [source] if isinstance(source, str) else list(source)
    if files == ["demo"]:
        return "demo"
    return {f: file_sha256(Path(f)) for f in files}


def check_compute(params: Params) -> None:
    """Enough GPUs for compute.nproc, and torchrun to launch them."""
    c = params.compute
    if pick_device(c.device).type == "cuda" and c.nproc > torch.cuda.device_count():
        raise ConfigError(f"compute.nproc is {c.nproc} but this machine has {torch.cuda.device_count()} GPUs: one "
                          "process per GPU (or compute.device: cpu for CPU processes)")
    if c.nproc > 1 and torchrun_path() is None:
        raise ConfigError(f"compute.nproc is {c.nproc} but torchrun is not installed (it comes with torch)")
