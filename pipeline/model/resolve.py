"""What a real `model.name_or_path` resolves to, checked without loading its weights."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.config import GGUF_BY_LLAMA_CPP, GGUF_WRITTEN, DatasetSpec, ModelParams, Params, TextSource
from pipeline.data import check_corpus_budgets, require_eos
from pipeline.errors import ConfigError
from pipeline.model.structure import count_params, hf_location, is_gguf, structure_of
from pipeline.run.distributed import pick_device
from pipeline.run.hashing import file_sha256, folder_sha256
from pipeline.run.launch import torchrun_path


def describe_model(p: ModelParams) -> dict:
    """Identity (hub id + revision, or folder + content hash), architecture and size; refuses
    models without the Llama block layout before anything is downloaded or loaded."""
    where, extra = hf_location(p.name_or_path)
    try:
        config = AutoConfig.from_pretrained(where, revision=p.revision, **extra)
    except OSError as err:
        raise ConfigError(f"model.name_or_path '{p.name_or_path}' cannot be resolved: {err}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    structure = structure_of(skeleton)
    local = Path(p.name_or_path)
    identity = {"kind": "gguf", "file_sha256": file_sha256(local)} if is_gguf(p.name_or_path) else \
        {"kind": "folder", "folder_sha256": folder_sha256(local)} if local.is_dir() else \
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
    total = round(target * levels * num_layers)
    if total in (0, levels * num_layers):  # every module at level 0 (or K): the search has nothing to move
        raise ConfigError(f"search.target {target} with database.levels {levels} over {num_layers} layers rounds "
                          f"to {'no level removed at all' if total == 0 else 'every module removed'}: "
                          f"{'raise' if total == 0 else 'lower'} search.target or raise database.levels")


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
    where, extra = hf_location(p.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(where, revision=p.revision, **extra)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path '{p.name_or_path}': its tokenizer cannot be loaded: {err}") from None


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


def check_optional_packages(params: Params) -> None:
    """lm-evaluation-harness (requirements-eval.txt) is installed only where it is used; llama-cpp-python
    (requirements.txt, built from source) may be missing where it was not built."""
    if params.evaluate.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("evaluate.lm_eval_tasks is set but lm-evaluation-harness is not installed: "
                          "pip install -r requirements-eval.txt (or set evaluate.lm_eval_tasks: [])")
    if params.evaluate.speed_gguf_type and importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError("evaluate.speed_gguf_type is set but llama-cpp-python, which runs the GGUF files, is not "
                          "installed: pip install -r requirements.txt (or set evaluate.speed_gguf_type: null)")
    by_llama_cpp = [t for t in params.export.gguf_types if t in GGUF_BY_LLAMA_CPP]
    if by_llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"export.gguf_types has {', '.join(by_llama_cpp)}, made by llama.cpp's quantizer, but "
                          "llama-cpp-python is not installed: pip install -r requirements.txt "
                          f"(or use {', '.join(GGUF_WRITTEN)})")


def check_compute(params: Params) -> None:
    """Enough GPUs for compute.nproc, and torchrun to launch them."""
    c = params.compute
    if pick_device(c.device).type == "cuda" and c.nproc > torch.cuda.device_count():
        raise ConfigError(f"compute.nproc is {c.nproc} but this machine has {torch.cuda.device_count()} GPUs: one "
                          "process per GPU (or compute.device: cpu for CPU processes)")
    if c.nproc > 1 and torchrun_path() is None:
        raise ConfigError(f"compute.nproc is {c.nproc} but torchrun is not installed (it comes with torch)")


def check_paths(params: Params) -> None:
    """Raises ConfigError naming the key whose folder or file is missing."""
    name = params.model.name_or_path
    if is_gguf(name):
        if not Path(name).is_file():
            raise ConfigError(f"model.name_or_path: GGUF file '{name}' not found")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"model.name_or_path '{name}' is a GGUF file, which needs the gguf package: "
                              "pip install -r requirements.txt")
    elif _looks_like_path(name) and not Path(name).is_dir():
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
