"""Typed params (params.yaml) with validation that names the key, the bad value and what is valid.

Every stage loads the whole file through `load_params`, so a typo anywhere stops the run before
any stage does work. params.yaml (and the presets in configs/) is the one source of values: only
genuinely optional keys have defaults here. Checks that look at files are in pipeline/validate_paths.py.
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

from pipeline.errors import ConfigError

Fitness = Literal["kl", "topk_kl", "ppl"]
FITNESS_KINDS = typing.get_args(Fitness)
# how a layer database chooses the units each level removes (pipeline/pruning/scored.py for all but obs)
DatabaseMethod = Literal["obs", "magnitude", "wanda_sp", "flap"]
# the neighbouring methods every run can report at the searched model's size (pipeline/search/baselines.py)
Baseline = Literal["uniform_magnitude", "wanda_sp", "flap", "cfsp", "shortgpt"]
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
            raise ValueError(f"is {'empty' if isinstance(value, str) else 'an empty list'}: give {what}")
        return value
    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(_number)]
Pos, PosFloat, NonNeg = Annotated[int, Field(gt=0)], Annotated[Float, Field(gt=0)], Annotated[int, Field(ge=0)]


class Section(BaseModel):
    """Immutable, refuses unknown keys, and no type coercion (true is no integer, "yes" no bool)."""
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


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
    # query: single query heads | kv_group: a key/value head with its query heads
    attn_unit: Literal["query", "kv_group"]
    mlp_unit: Pos  # neurons removed together (e.g. 64 or 128 for hardware-friendly widths)
    method: DatabaseMethod = "obs"  # obs (DarwinLM) | magnitude | wanda_sp | flap: how units are chosen


class SelectionStage(Section):
    survivors: Pos
    fitness_tokens: Pos
    train_tokens: NonNeg = 0


class SearchParams(Section):
    target: Annotated[Float, Field(gt=0, lt=1)]  # fraction of attention+MLP parameters to remove, 0 < target < 1
    generations: Pos
    offspring: Pos
    max_level_switches: Pos  # mutation applies min(U{1..n}, U{1..n}) level switches
    schedule: Annotated[tuple[SelectionStage, ...], Strict(False)]  # survivors shrink stage by stage down to 1
    tas: bool  # training-aware selection: train candidates on each stage's train_tokens first
    train_lr: PosFloat  # AdamW learning rate of that training (constant)
    train_batch_size: Pos  # sequences per step of that training
    fitness: Fitness  # kl | topk_kl | ppl
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
        if not self.schedule:
            raise ConfigError("search.schedule is empty: give at least one stage "
                              "{survivors, fitness_tokens, train_tokens}")
        previous = self.offspring
        for i, stage in enumerate(self.schedule):
            if stage.survivors > previous:
                raise ConfigError(f"search.schedule[{i}].survivors ({stage.survivors}) exceeds the candidates "
                                  f"entering that stage ({previous}); survivors must shrink stage by stage")
            previous = stage.survivors
        if previous != 1:
            raise ConfigError(f"search.schedule[-1].survivors is {previous}: "
                              "the last stage must keep exactly 1 (the next parent)")
        return self


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
    baselines: list[Baseline] = []  # neighbouring methods built and evaluated one-shot at the searched size
    finetune_baselines: list[Baseline] = []  # of those, the ones also trained as the searched model is (finetune.*)

    @model_validator(mode="after")
    def _baselines_once(self):
        for key in ("baselines", "finetune_baselines"):
            names = getattr(self, key)
            repeated = sorted({b for b in names if names.count(b) > 1})
            if repeated:
                raise ConfigError(f"evaluate.{key} lists {', '.join(repeated)} more than once")
        missing = [b for b in self.finetune_baselines if b not in self.baselines]
        if missing:
            raise ConfigError(f"evaluate.finetune_baselines lists {', '.join(missing)}, which evaluate.baselines "
                              f"does not build ({', '.join(self.baselines) or 'none'}): add them there")
        return self


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"lists {values} with repeats: give each once")
    return values


class ExportParams(Section):
    # GGUF files for llama.cpp written for dense, searched and uniform: models/gguf/<model>-<type>.gguf
    gguf_types: Annotated[list[GgufType], _given("GGUF types, e.g. [f16, q8_0]"), AfterValidator(_distinct)]


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
    tracking: TrackingParams
    compute: ComputeParams

    @property
    def is_demo(self) -> bool:
        return self.model.name_or_path == "demo"

    @model_validator(mode="after")
    def _sections_agree(self):
        for i, stage in enumerate(self.search.schedule):
            for kind in ("fitness", "train"):
                asked, available = getattr(stage, f"{kind}_tokens"), getattr(self.data, f"{kind}_tokens")
                if asked > available:
                    raise ConfigError(f"search.schedule[{i}].{kind}_tokens ({asked}) exceeds data.{kind}_tokens "
                                      f"({available}), the {kind} set it draws from")
        gguf_type = self.evaluate.speed_gguf_type
        if gguf_type is not None and gguf_type not in self.export.gguf_types:
            raise ConfigError(f"evaluate.speed_gguf_type is '{gguf_type}' but export.gguf_types "
                              f"({', '.join(self.export.gguf_types)}) does not export it: add it there or pick one "
                              "of those")
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params file '{path}' is not valid YAML: {err}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0])) from None


_EXPECTED = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
             "string_type": "a string",
             "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping of keys"}
_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # as in "must be > 0"; a range reads "0 < x <= 1"


def _message(error: dict) -> str:
    """One line for pydantic's error: the dotted key (with list indexes), the bad value, what is valid."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx", {})
    key, field, parent = _locate(error["loc"], kind == "extra_forbidden")
    if kind == "value_error":  # a rule of ours: ConfigErrors name their keys, other messages follow the key
        return str(ctx["error"]) if isinstance(ctx["error"], ConfigError) else f"{key} {ctx['error']}"
    if kind == "extra_forbidden":
        where = key.rpartition(".")[0]
        return f"unknown key '{key}'; valid keys{' in ' + where if where else ''}: {', '.join(parent.model_fields)}"
    if kind == "missing":
        return f"missing key '{key}'"
    if kind == "literal_error":
        return f"{key} is {value!r}: valid values are {ctx['expected']}"
    if kind in _EXPECTED:
        return f"{key or 'params'}: expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}"
    bounds = {op: getattr(m, op) for m in (field.metadata if field else ()) for op in _SIGNS if hasattr(m, op)} or {
        op: bound for op, bound in ctx.items() if op in _SIGNS}  # an optional field's bound is only in ctx
    low, high = [next((op for op in ops if op in bounds), None) for ops in (("gt", "ge"), ("lt", "le"))]
    if low and high:  # a range, e.g. "0 <= damp < 1"
        return (f"{key} is {value!r}: valid is {bounds[low]} {_SIGNS[low].replace('>', '<')} "
                f"{key.rpartition('.')[2]} {_SIGNS[high]} {bounds[high]}")
    if low or high:
        return f"{key} is {value!r}: must be {_SIGNS[low or high]} {bounds[low or high]}"
    return f"{key}: {error['msg']}"


def _locate(loc: tuple, extra: bool):
    """(dotted key, its pydantic field, the model holding it); skips pydantic's union tags in `loc`."""
    model, field, parent, key = Params, None, Params, ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            key += f"[{part}]"
        elif model is not None and (part in model.model_fields or extra and i == len(loc) - 1):
            parent, field = model, model.model_fields.get(part)
            key = f"{key}.{part}" if key else part
            model = _model_in(field.annotation) if field else None
    return key, field, parent


def _model_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, typing.get_args(annotation)) if m), None)
