"""Typed params (params.yaml) with validation that names the key, the bad value and what is valid.

Every stage loads the whole file through `load_params`, so a typo anywhere stops the run before
any stage does work. params.yaml (and the presets in configs/) is the one source of values: only
genuinely optional keys have defaults here. Checks that look at files belong to the validate stage
(pipeline/model/resolve.py).
"""
from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from pipeline.errors import ConfigError

# the neighbouring methods every run can report at the searched model's size (pipeline/search/baselines.py)
Baseline = Literal["uniform_magnitude", "wanda_sp", "flap", "cfsp", "minitron", "ziplm", "shortgpt"]
# GGUF types written by the `gguf` package, and those made by llama.cpp's quantizer (llama-cpp-python).
GgufWritten = Literal["f32", "f16", "q8_0"]
GgufByLlamaCpp = Literal["q4_0", "q4_k_m", "q5_k_m", "q6_k"]
GGUF_WRITTEN, GGUF_BY_LLAMA_CPP = typing.get_args(GgufWritten), typing.get_args(GgufByLlamaCpp)
GgufType = Literal[GgufWritten, GgufByLlamaCpp]


def _number(value):  # YAML 1.1 reads "1e-5" (no dot) as a string
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _given(what: str) -> AfterValidator:
    """Refuses a blank string or an empty list, saying what to give instead."""
    def check(value):
        if not (value.strip() if isinstance(value, str) else value):
            raise ValueError(f"give {what}")
        return value
    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(_number)]
Pos, PosFloat, NonNeg = Annotated[int, Field(gt=0)], Annotated[Float, Field(gt=0)], Annotated[int, Field(ge=0)]


def _distinct(values: list) -> list:
    if repeated := sorted({v for v in values if values.count(v) > 1}):
        raise ValueError(f"repeats {', '.join(repeated)}; give each once")
    return values


Baselines = Annotated[list[Baseline], AfterValidator(_distinct)]


class Section(BaseModel):
    """Immutable, refuses unknown keys, and no type coercion (true is no integer, "yes" no bool)."""
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):  # pydantic's own error for an unknown key does not say which keys are valid
        if isinstance(data, dict) and (unknown := [k for k in data if k not in cls.model_fields]):
            raise PydanticCustomError("unknown_key", "unknown key '{key}'",
                                      {"key": unknown[0], "valid": ", ".join(cls.model_fields)})
        return data


class ModelParams(Section):
    name_or_path: Annotated[str, _given("'demo', a hub id or a local folder")]  # "demo", a hub id, or a local folder
    dtype: Literal["float32", "bfloat16", "float16"]  # weights dtype for loading a real model
    revision: str | None = None  # hub revision (branch, tag or commit)


class DemoParams(Section):
    """The embedded default: a small GQA Llama pretrained on Python's standard library sources."""
    corpus_bytes: Pos  # bytes of stdlib source used for training text
    eval_bytes: Pos  # bytes of (other) stdlib files held out for evaluation
    vocab_size: Annotated[int, Field(ge=260)]  # at least 256 bytes + specials
    hidden_size: Pos
    num_layers: Pos
    num_heads: Pos
    num_kv_heads: Pos
    intermediate_size: Pos
    seq_len: Pos
    steps: Pos
    batch_size: Pos
    lr: PosFloat
    seed: int

    @model_validator(mode="after")
    def _heads_divide(self):
        for big, small in (("hidden_size", "num_heads"), ("num_heads", "num_kv_heads")):
            if getattr(self, big) % getattr(self, small):
                raise ConfigError(f"demo.{big} ({getattr(self, big)}) must be divisible by "
                                  f"demo.{small} ({getattr(self, small)})")
        return self


class DatasetSpec(Section):
    """A Hugging Face dataset: `datasets.load_dataset(path, name, split=split, data_files=data_files)[text_field]`."""
    path: Annotated[str, _given("a hub dataset id or a local dataset folder")]
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files: str | list[str] | None = None  # only these files of the dataset (e.g. one parquet shard)
    max_documents: Pos | None = None  # read at most this many documents (streaming-friendly cap)


def _source_kind(value) -> str:
    return "<dataset>" if isinstance(value, (dict, DatasetSpec)) else "<files>" if isinstance(value, list) else "<file>"


# "demo", a text file, a list of text files, or a mapping read as a DatasetSpec
TextSource = Annotated[
    Annotated[str, Tag("<file>")]
    | Annotated[list[str], _given("'demo' or text files"), Tag("<files>")]
    | Annotated[DatasetSpec, Tag("<dataset>")],
    Discriminator(_source_kind),
]


class DataParams(Section):
    train: TextSource  # feeds calib, fitness and train token sets (disjoint)
    eval: TextSource  # held out: perplexity only
    seq_len: Pos
    calib_tokens: Pos
    fitness_tokens: Pos
    train_tokens: Pos
    eval_tokens: Pos
    seed: int

    @model_validator(mode="after")
    def _at_least_one_sequence(self):
        for name in ("calib_tokens", "fitness_tokens", "train_tokens", "eval_tokens"):
            if getattr(self, name) < self.seq_len:
                raise ConfigError(f"data.{name} ({getattr(self, name)}) is less than one sequence "
                                  f"(data.seq_len = {self.seq_len})")
        return self


class DatabaseParams(Section):
    levels: Annotated[int, Field(ge=2)]  # K: level k removes round(k/K * units) units of a module; K+1 levels in all
    damp: Annotated[Float, Field(ge=0, lt=1)]  # Hessian dampening, relative to mean(diag H)
    hessian_dtype: Literal["float32", "float64"]
    batch_size: Pos  # calibration sequences per forward pass
    attn_unit: Literal["query", "kv_group"]  # query: single query heads | kv_group: a key/value head and its queries
    mlp_unit: Pos  # neurons removed together (e.g. 64 or 128 for hardware-friendly widths)
    # how units are chosen: obs (DarwinLM) | magnitude | wanda_sp | flap (pipeline/pruning/scored.py for all but obs)
    method: Literal["obs", "magnitude", "wanda_sp", "flap"] = "obs"


class SelectionStage(Section):
    survivors: Pos
    fitness_tokens: Pos
    train_tokens: NonNeg = 0


class SearchParams(Section):
    target: Annotated[Float, Field(gt=0, lt=1)]  # fraction of attention+MLP parameters to remove, 0 < target < 1
    generations: Pos
    offspring: Pos
    max_level_switches: Pos  # mutation applies min(U{1..n}, U{1..n}) level switches
    schedule: Annotated[tuple[SelectionStage, ...], Strict(False),  # survivors shrink stage by stage down to 1
                        _given("at least one stage {survivors, fitness_tokens, train_tokens}")]
    tas: bool  # training-aware selection: train candidates on each stage's train_tokens first
    train_lr: PosFloat  # AdamW learning rate of that training (constant)
    train_batch_size: Pos  # sequences per step of that training
    fitness: Literal["kl", "topk_kl", "ppl"]
    topk: Pos  # tokens kept per position for topk_kl
    budget: Literal["levels", "params"]  # levels: level sums fixed per module type | params: total size fixed
    # width: any level 0..K per module | depth: whole attention / MLP sublayers only (levels 0 or K; EvoPress)
    space: Literal["width", "depth"] = "width"
    # budget params: allowed size deviation, fraction of dense attention+MLP
    budget_tolerance: Annotated[Float, Field(gt=0, lt=0.5)]
    eval_every: NonNeg  # log the parent's eval perplexity every N generations (0 = never)
    batch_size: Pos  # sequences per forward pass when scoring fitness
    seed: int

    @model_validator(mode="after")
    def _schedule_shrinks_to_one(self):
        check_schedule(self.schedule, self.offspring, "search.schedule")
        return self


def check_schedule(schedule, offspring: int, key: str) -> None:
    previous = offspring
    for i, stage in enumerate(schedule):
        if stage.survivors > previous:
            raise ConfigError(f"{key}[{i}].survivors ({stage.survivors}) exceeds the candidates "
                              f"entering that stage ({previous}); survivors must shrink stage by stage")
        previous = stage.survivors
    if previous != 1:
        raise ConfigError(f"{key}[-1].survivors is {previous}: the last stage must keep exactly 1 (the next parent)")


class FinetuneParams(Section):
    steps: NonNeg  # 0 = no training
    batch_size: Pos  # sequences per step, split over compute.nproc processes
    lr: PosFloat
    weight_decay: Annotated[Float, Field(ge=0)]
    warmup_steps: NonNeg
    distill: Annotated[Float, Field(ge=0, le=1)]  # weight of the KL(dense || pruned) term; 0 = causal-LM loss only
    temperature: PosFloat
    checkpoint_every: NonNeg  # steps between resumable checkpoints (0 = none)
    seed: int


class EvaluateParams(Section):
    batch_size: Pos
    speed: bool  # measure prefill / decode speed and memory of dense vs pruned models
    speed_prompt_len: Pos
    speed_decode_tokens: Pos
    speed_batch_size: Pos
    speed_repeats: Pos
    speed_gguf_type: GgufType | None  # also measure the GGUF files of this type in llama.cpp (null: do not)
    lm_eval_tasks: list[str]  # lm-evaluation-harness tasks, e.g. [sciq, piqa]
    lm_eval_include_path: str | None = None  # a folder of local task YAMLs (data may be local files)
    lm_eval_limit: Pos | None = None  # documents per task (None = all)
    lm_eval_fewshot: dict[str, NonNeg] = {}  # few-shot examples per task, e.g. {arc_challenge: 25}; else its default
    baselines: Baselines = []  # neighbouring methods built and evaluated one-shot at the searched size
    finetune_baselines: Baselines = []  # of those, the ones also trained as the searched model is (finetune.*)

    @model_validator(mode="after")
    def _finetuned_baselines_are_built(self):
        if missing := [b for b in self.finetune_baselines if b not in self.baselines]:
            raise ConfigError(f"evaluate.finetune_baselines lists {', '.join(missing)}, which evaluate.baselines "
                              f"does not build ({', '.join(self.baselines) or 'none'}): add them there")
        return self


class ShearedParams(Section):
    # Sheared-LLaMA's learned pruning (pipeline/pruning/sheared.py), built by the recovery stage
    steps: Pos  # mask (and weight) training steps; their tokens are charged to the method
    batch_size: Pos
    lr: PosFloat  # the weights (reference: 1e-4)
    mask_lr: PosFloat  # the masks' log_alpha and the Lagrange multipliers (reference: 1.0)
    warmup_steps: NonNeg  # the target ramps from 0 over these steps (reference: lagrangian_warmup_steps)
    seed: int


RecoveryMethod = Literal["searched", "uniform", "sheared"]


class RecoveryParams(Section):
    # recovery curves: searched, uniform, sheared and one baseline trained alike, perplexity against tokens
    enabled: bool
    steps: Pos  # about the largest budget, in steps of finetune.batch_size sequences
    points: Annotated[int, Field(ge=2)]  # budgets m * sqrt(5)^k, k < points (even k exactly 5x apart), and 0
    baseline: Baseline  # the one-shot baseline trained beside them


class ExportParams(Section):
    # GGUF files for llama.cpp written for dense, searched and uniform: models/gguf/<model>-<type>.gguf
    gguf_types: Annotated[list[GgufType], _given("GGUF types, e.g. [f16, q8_0]"), AfterValidator(_distinct)]


# llama.cpp's presets of a whole model (llama-quantize's names), made from the dense f16 file
LlamaPreset = Literal["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0",
                      "iq4_nl", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]
LADDER = Literal["f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "iq4_nl", "q4_0", "q3_k", "q2_k"]
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(value) -> tuple[str, float]:
    """A file-size budget as ("bytes", n), ("fraction", f) of the dense f16 file, or ("preset", name): the size
    of llama.cpp's own preset of the dense model. Raises ValueError saying what is valid."""
    valid = ("give bytes (e.g. 80000000 or '75MB' / '72MiB'), a fraction of the dense f16 file between 0 and 1 "
             f"(e.g. 0.35), or a llama.cpp preset ({', '.join(typing.get_args(LlamaPreset))})")
    if isinstance(value, bool):
        raise ValueError(valid)
    if isinstance(value, int) and value > 0:
        return "bytes", value
    if isinstance(value, float) and 0 < value < 1:
        return "fraction", value
    if isinstance(value, str):
        if value in typing.get_args(LlamaPreset):
            return "preset", value
        number = value.upper().rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        unit = value.upper()[len(number):] or "B"
        try:
            if unit in _SIZE_UNITS and float(number) > 0:
                return "bytes", float(number) * _SIZE_UNITS[unit]
        except ValueError:
            pass
    raise ValueError(valid)


def _budgets(values: list) -> list:
    for v in values:
        try:
            parse_budget(v)
        except ValueError as error:
            raise ValueError(f"{v!r}: {error}") from None
    _distinct([str(v) for v in values])
    return values


class SizeParams(Section):
    """Searches at file-size budgets (pipeline/search/joint.py): structure and per-tensor GGUF types together,
    measured in llama.cpp against llama.cpp's own presets of the dense model at equal bytes. Off while
    `budgets` is empty (needs llama-cpp-python: requirements-eval.txt)."""
    budgets: Annotated[list[int | float | str], Strict(False), AfterValidator(_budgets)] = []
    quant_types: Annotated[list[LADDER], _given("GGUF types, e.g. [q8_0, q6_k, q5_k, q4_k, q3_k]"),
                           AfterValidator(_distinct)] = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k"]
    # joint: levels and types | quant: types, levels 0 | structure: levels, every tensor structure_type |
    # structure_q4_k_m: levels at q4_k, then llama.cpp's own q4_k_m of the pruned model
    rows: Annotated[list[Literal["joint", "quant", "structure", "structure_q4_k_m"]],
                    _given("search rows, e.g. [joint, quant, structure]"),
                    AfterValidator(_distinct)] = ["joint", "quant", "structure", "structure_q4_k_m"]
    structure_type: LADDER = "q8_0"  # the one type of the structure-only row
    presets: Annotated[list[LlamaPreset], AfterValidator(_distinct)] = ["q8_0", "q6_k", "q5_k_m", "q4_k_m",
                                                                        "q3_k_m", "q2_k"]
    generations: Pos = 25  # generations of each byte search (offspring and fitness: search.*)
    # the byte searches' selection (training-aware selection is off there); None: search.schedule
    schedule: Annotated[tuple[SelectionStage, ...] | None, Strict(False)] = None
    eval_windows: Pos = 24  # windows of data.seq_len eval tokens measured in llama.cpp
    speed_repeats: Pos = 3  # interleaved llama.cpp speed rounds per file (medians)
    cache_mb: Pos = 1024  # quantized tensors kept for reuse during the search


class TrackingParams(Section):
    enabled: bool
    experiment: Annotated[str, _given("an MLflow experiment name")]
    register_as: str | None = None  # register the pruned models as '<register_as>-searched' / '-uniform'


class ComputeParams(Section):
    """How the database, search and finetune stages run. Not a DVC dependency of any stage: the
    results do not depend on it (up to float round-off), so changing it re-runs nothing."""
    nproc: Pos  # processes on this machine (torchrun): one per GPU, or CPU processes with gloo
    device: Literal["auto", "cuda", "cpu"]  # auto: each process's GPU when there is one, else the CPU
    fsdp: bool  # finetune: shard weights/gradients/optimiser over processes instead of replicating (DDP)
    activations: Literal["auto", "memory", "disk"]  # database calibration activations (auto: disk when RAM is short)
    threads: Pos | None = None  # torch threads per process (None: this process's cores / processes per machine)


class Params(Section):
    model: ModelParams
    demo: DemoParams
    data: DataParams
    database: DatabaseParams
    search: SearchParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    export: ExportParams
    size: SizeParams  # required: dvc.yaml expands one stage per size.budgets entry
    sheared: ShearedParams
    recovery: RecoveryParams
    tracking: TrackingParams
    compute: ComputeParams

    @property
    def is_demo(self) -> bool:
        return self.model.name_or_path == "demo"

    @model_validator(mode="after")
    def _sections_agree(self):
        if self.size.schedule is not None:
            check_schedule(self.size.schedule, self.search.offspring, "size.schedule")
            if bad := [st.fitness_tokens for st in self.size.schedule if st.fitness_tokens > self.data.fitness_tokens]:
                raise ConfigError(f"size.schedule asks for {bad[0]} fitness tokens, more than data.fitness_tokens "
                                  f"({self.data.fitness_tokens})")
        for i, stage in enumerate(self.search.schedule):
            for kind in ("fitness", "train"):
                asked, available = getattr(stage, f"{kind}_tokens"), getattr(self.data, f"{kind}_tokens")
                if asked > available:
                    raise ConfigError(f"search.schedule[{i}].{kind}_tokens ({asked}) exceeds data.{kind}_tokens "
                                      f"({available}), the {kind} set it draws from")
        if (gguf_type := self.evaluate.speed_gguf_type) not in (None, *self.export.gguf_types):
            raise ConfigError(f"evaluate.speed_gguf_type is '{gguf_type}' but export.gguf_types "
                              f"({', '.join(self.export.gguf_types)}) does not export it: add it there or pick one "
                              "of those")
        if self.size.budgets and self.size.eval_windows * self.data.seq_len > self.data.eval_tokens:
            raise ConfigError(f"size.eval_windows ({self.size.eval_windows}) x data.seq_len ({self.data.seq_len}) "
                              f"exceeds data.eval_tokens ({self.data.eval_tokens})")
        if self.finetune.batch_size % self.compute.nproc:
            raise ConfigError(f"finetune.batch_size ({self.finetune.batch_size}) must be divisible by compute.nproc "
                              f"({self.compute.nproc}): each process trains on an equal share of every batch")
        if not self.is_demo:
            for name in ("train", "eval"):
                if getattr(self.data, name) == "demo":
                    raise ConfigError(f"data.{name} is 'demo' but model.name_or_path is "
                                      f"'{self.model.name_or_path}': the demo corpus only goes with the demo model; "
                                      "give a text file, a list of files or a dataset {path, name, split, text_field}")
        elif self.data.seq_len > self.demo.seq_len:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds the demo model's context "
                              f"(demo.seq_len = {self.demo.seq_len})")
        return self


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate a params file; raises ConfigError naming the bad key."""
    try:
        return Params.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except OSError as err:
        raise ConfigError(f"params file '{path}' cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"params file '{path}' is not valid YAML: {err}") from None
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0])) from None


def _message(error: ErrorDetails) -> str:
    """One line for pydantic's error: the dotted key, the bad value and pydantic's words for what is valid.
    The validators' ConfigErrors name their keys themselves."""
    key, ctx = _dotted(error["loc"]), error.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):
        return str(ctx["error"])
    if error["type"] == "unknown_key":  # from Section._known_keys
        where = f" in {key}" if key else ""
        return f"unknown key '{_dotted((*error['loc'], ctx['key']))}'; valid keys{where}: {ctx['valid']}"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    return f"{key or 'params'} is {error['input']!r}: {error['msg'].removeprefix('Value error, ')}"


def _dotted(loc: tuple) -> str:
    """("search", "schedule", 0, "survivors") -> "search.schedule[0].survivors", leaving out TextSource's tags."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if not str(p).startswith("<")).lstrip(".")
