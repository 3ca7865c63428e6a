"""Typed params (params.yaml) with validation that names the key, the bad value and what is valid.

Every stage loads the whole file through `load_params`, so a typo anywhere stops the run before
any stage does work.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import ConfigError

FITNESS_KINDS = ("kl", "topk_kl", "ppl")


@dataclass(frozen=True)
class ModelParams:
    name_or_path: str = "demo"  # "demo", a Hugging Face hub id, or a local folder
    dtype: str = "float32"  # weights dtype for loading a real model
    revision: str | None = None  # hub revision (branch, tag or commit)

    def check(self, key: str) -> None:
        _one_of(f"{key}.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if not self.name_or_path.strip():
            raise ConfigError(f"{key}.name_or_path is empty: give 'demo', a hub id or a local folder")
        if _looks_like_path(self.name_or_path) and not Path(self.name_or_path).is_dir():
            raise ConfigError(
                f"{key}.name_or_path: folder '{self.name_or_path}' does not exist "
                "(give 'demo', a Hugging Face hub id such as 'meta-llama/Llama-3.1-8B', or an existing folder)")
        if Path(self.name_or_path).is_dir() and not (Path(self.name_or_path) / "config.json").is_file():
            raise ConfigError(f"{key}.name_or_path: folder '{self.name_or_path}' has no config.json "
                              "(it must be a Hugging Face model folder)")


@dataclass(frozen=True)
class DemoParams:
    """The embedded default: a small GQA Llama pretrained on Python's standard library sources."""
    corpus_bytes: int = 3_000_000  # bytes of stdlib source used for training text
    eval_bytes: int = 400_000  # bytes of (other) stdlib files held out for evaluation
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 384
    seq_len: int = 128
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def check(self, key: str) -> None:
        for name in ("corpus_bytes", "eval_bytes", "vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "seq_len", "steps", "batch_size"):
            _positive(f"{key}.{name}", getattr(self, name))
        _positive(f"{key}.lr", self.lr)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{key}.hidden_size ({self.hidden_size}) must be divisible by "
                              f"{key}.num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{key}.num_heads ({self.num_heads}) must be divisible by "
                              f"{key}.num_kv_heads ({self.num_kv_heads})")
        if self.vocab_size < 260:
            raise ConfigError(f"{key}.vocab_size is {self.vocab_size}: at least 260 (256 bytes + specials)")


@dataclass(frozen=True)
class DatasetSpec:
    """A Hugging Face dataset: `datasets.load_dataset(path, name, split=split, data_files=data_files)[text_field]`."""
    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files: str | list[str] | None = None  # only these files of the dataset (e.g. one parquet shard)
    max_documents: int | None = None  # read at most this many documents (streaming-friendly cap)

    def check(self, key: str) -> None:
        if not self.path.strip():
            raise ConfigError(f"{key}.path is empty: give a hub dataset id or a local dataset folder")
        if self.max_documents is not None:
            _positive(f"{key}.max_documents", self.max_documents)


TextSource = typing.Union[str, list[str], DatasetSpec]


@dataclass(frozen=True)
class DataParams:
    train: TextSource = "demo"  # feeds calib, fitness and train token sets (disjoint)
    eval: TextSource = "demo"  # held out: perplexity only
    seq_len: int = 128
    calib_tokens: int = 65_536
    fitness_tokens: int = 16_384
    train_tokens: int = 262_144
    eval_tokens: int = 65_536
    seed: int = 0

    def check(self, key: str) -> None:
        for name in ("seq_len", "calib_tokens", "fitness_tokens", "train_tokens", "eval_tokens"):
            _positive(f"{key}.{name}", getattr(self, name))
        for name in ("calib_tokens", "fitness_tokens", "train_tokens", "eval_tokens"):
            if getattr(self, name) < self.seq_len:
                raise ConfigError(f"{key}.{name} ({getattr(self, name)}) is less than one sequence "
                                  f"({key}.seq_len = {self.seq_len})")
        for name in ("train", "eval"):
            _check_source(f"{key}.{name}", getattr(self, name))


@dataclass(frozen=True)
class DatabaseParams:
    levels: int = 10  # K: level k removes round(k/K * units) units of a module; K+1 levels in all
    damp: float = 0.01  # Hessian dampening, relative to mean(diag H)
    hessian_dtype: str = "float64"
    batch_size: int = 8  # calibration sequences per forward pass
    attn_unit: str = "query"  # query: single query heads | kv_group: a key/value head with its query heads
    mlp_unit: int = 1  # neurons removed together (e.g. 64 or 128 for hardware-friendly widths)

    def check(self, key: str) -> None:
        if self.levels < 2:
            raise ConfigError(f"{key}.levels is {self.levels}: at least 2 (levels 0..K, K >= 2)")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"{key}.damp is {self.damp}: valid is 0 <= damp < 1 (0.01 is typical)")
        _one_of(f"{key}.hessian_dtype", self.hessian_dtype, ("float32", "float64"))
        _one_of(f"{key}.attn_unit", self.attn_unit, ("query", "kv_group"))
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.mlp_unit", self.mlp_unit)


@dataclass(frozen=True)
class SelectionStage:
    survivors: int
    fitness_tokens: int
    train_tokens: int = 0

    def check(self, key: str) -> None:
        _positive(f"{key}.survivors", self.survivors)
        _positive(f"{key}.fitness_tokens", self.fitness_tokens)
        if self.train_tokens < 0:
            raise ConfigError(f"{key}.train_tokens is {self.train_tokens}: must be >= 0")


@dataclass(frozen=True)
class SearchParams:
    target: float = 0.5  # fraction of attention+MLP parameters to remove, 0 < target < 1
    generations: int = 40
    offspring: int = 16
    max_level_switches: int = 3  # mutation applies min(U{1..n}, U{1..n}) level switches
    schedule: tuple[SelectionStage, ...] = (
        SelectionStage(survivors=4, fitness_tokens=1024),
        SelectionStage(survivors=2, fitness_tokens=2048),
        SelectionStage(survivors=1, fitness_tokens=4096),
    )
    tas: bool = True  # training-aware selection: train candidates on each stage's train_tokens first
    train_lr: float = 1e-5  # AdamW learning rate of that training (constant)
    train_batch_size: int = 1  # sequences per step of that training
    fitness: str = "kl"  # kl | topk_kl | ppl
    topk: int = 256  # tokens kept per position for topk_kl
    budget: str = "levels"  # levels: level sums fixed per module type; params: total size fixed, types trade
    budget_tolerance: float = 0.005  # budget params: allowed size deviation, fraction of dense attention+MLP
    eval_every: int = 10  # log the parent's eval perplexity every N generations (0 = never)
    batch_size: int = 8  # sequences per forward pass when scoring fitness
    seed: int = 0

    def check(self, key: str) -> None:
        if not 0 < self.target < 1:
            raise ConfigError(f"{key}.target is {self.target}: the fraction of attention+MLP parameters "
                              "to remove must satisfy 0 < target < 1")
        for name in ("generations", "offspring", "max_level_switches", "train_batch_size", "batch_size", "topk"):
            _positive(f"{key}.{name}", getattr(self, name))
        _positive(f"{key}.train_lr", self.train_lr)
        _one_of(f"{key}.fitness", self.fitness, FITNESS_KINDS)
        _one_of(f"{key}.budget", self.budget, ("levels", "params"))
        if not 0 < self.budget_tolerance < 0.5:
            raise ConfigError(f"{key}.budget_tolerance is {self.budget_tolerance}: valid is 0 < tolerance < 0.5")
        if self.eval_every < 0:
            raise ConfigError(f"{key}.eval_every is {self.eval_every}: must be >= 0 (0 = never)")
        if not self.schedule:
            raise ConfigError(f"{key}.schedule is empty: give at least one stage "
                              "{survivors, fitness_tokens, train_tokens}")
        previous = self.offspring
        for i, stage in enumerate(self.schedule):
            stage.check(f"{key}.schedule[{i}]")
            if stage.survivors > previous:
                raise ConfigError(f"{key}.schedule[{i}].survivors ({stage.survivors}) exceeds the candidates "
                                  f"entering that stage ({previous}); survivors must shrink stage by stage")
            previous = stage.survivors
        if self.schedule[-1].survivors != 1:
            raise ConfigError(f"{key}.schedule[-1].survivors is {self.schedule[-1].survivors}: "
                              "the last stage must keep exactly 1 (the next parent)")


@dataclass(frozen=True)
class FinetuneParams:
    steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    distill: float = 0.5  # weight of the KL(dense || pruned) term; 0 = causal-LM loss only
    temperature: float = 1.0
    checkpoint_every: int = 50  # steps between resumable checkpoints (0 = none)
    seed: int = 0

    def check(self, key: str) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError(f"{key}.checkpoint_every is {self.checkpoint_every}: must be >= 0 (0 = no checkpoints)")
        if self.steps < 0:
            raise ConfigError(f"{key}.steps is {self.steps}: must be >= 0 (0 = no training)")
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.lr", self.lr)
        _positive(f"{key}.temperature", self.temperature)
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError(f"{key}.weight_decay and {key}.warmup_steps must be >= 0")
        if not 0 <= self.distill <= 1:
            raise ConfigError(f"{key}.distill is {self.distill}: valid is 0 <= distill <= 1 "
                              "(weight of distillation vs. causal-LM loss)")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 8
    speed: bool = True  # measure prefill / decode speed and memory of dense vs pruned models
    speed_prompt_len: int = 128
    speed_decode_tokens: int = 32
    speed_batch_size: int = 1
    speed_repeats: int = 5
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks, e.g. [sciq, piqa]
    lm_eval_include_path: str | None = None  # a folder of local task YAMLs (data may be local files)
    lm_eval_limit: int | None = None  # documents per task (None = all)

    def check(self, key: str) -> None:
        for name in ("batch_size", "speed_prompt_len", "speed_decode_tokens", "speed_batch_size", "speed_repeats"):
            _positive(f"{key}.{name}", getattr(self, name))
        if self.lm_eval_include_path is not None and not Path(self.lm_eval_include_path).is_dir():
            raise ConfigError(f"{key}.lm_eval_include_path: folder '{self.lm_eval_include_path}' does not exist")
        if self.lm_eval_limit is not None:
            _positive(f"{key}.lm_eval_limit", self.lm_eval_limit)


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool = True
    experiment: str = "darwinlm"

    def check(self, key: str) -> None:
        if not self.experiment.strip():
            raise ConfigError(f"{key}.experiment is empty: give an MLflow experiment name")


@dataclass(frozen=True)
class ComputeParams:
    """How the database, search and finetune stages run. Not a DVC dependency of any stage: the
    results do not depend on it (up to float round-off), so changing it re-runs nothing."""
    nproc: int = 1  # processes on this machine (torchrun): one per GPU, or CPU processes with gloo
    device: str = "auto"  # auto: each process's GPU when there is one, else the CPU | cuda | cpu
    fsdp: bool = False  # finetune: shard weights/gradients/optimiser over processes instead of replicating (DDP)
    activations: str = "auto"  # database calibration activations: memory | disk | auto (disk when RAM is short)

    def check(self, key: str) -> None:
        _positive(f"{key}.nproc", self.nproc)
        _one_of(f"{key}.device", self.device, ("auto", "cuda", "cpu"))
        _one_of(f"{key}.activations", self.activations, ("auto", "memory", "disk"))


@dataclass(frozen=True)
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    demo: DemoParams = field(default_factory=DemoParams)
    data: DataParams = field(default_factory=DataParams)
    database: DatabaseParams = field(default_factory=DatabaseParams)
    search: SearchParams = field(default_factory=SearchParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    compute: ComputeParams = field(default_factory=ComputeParams)

    @property
    def is_demo(self) -> bool:
        return self.model.name_or_path == "demo"

    def check(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f.name)
        for i, stage in enumerate(self.search.schedule):
            for kind in ("fitness", "train"):
                asked, available = getattr(stage, f"{kind}_tokens"), getattr(self.data, f"{kind}_tokens")
                if asked > available:
                    raise ConfigError(f"search.schedule[{i}].{kind}_tokens ({asked}) exceeds data.{kind}_tokens "
                                      f"({available}), the {kind} set it draws from")
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


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate a params file; raises ConfigError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params file '{path}' is not valid YAML: {err}") from None
    params = parse(Params, raw, "")
    params.check()
    return params


def parse(cls, raw, key: str):
    """Build dataclass `cls` from plain YAML data, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'params'} must be a mapping of keys, got {type(raw).__name__}: {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown key '{where}{unknown[0]}'; valid keys{' in ' + key if key else ''}: "
                          f"{', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _convert(hints[name], value, f"{key}.{name}" if key else name)
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{key}: missing required key '{missing[0]}'")
    return cls(**values)


def _convert(hint, value, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        shaped = [o for o in options if o is not type(None) and _same_shape(o, value)]
        if len(shaped) == 1:  # e.g. a mapping can only be the dataclass option: report its own error
            return _convert(shaped[0], value, key)
        for option in shaped:
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not valid; expected {_describe(hint)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported params type {hint} for {key}")


def _same_shape(hint, value) -> bool:
    if isinstance(value, dict):
        return dataclasses.is_dataclass(hint)
    if isinstance(value, list):
        return typing.get_origin(hint) in (list, tuple)
    return not dataclasses.is_dataclass(hint) and typing.get_origin(hint) not in (list, tuple)


def _describe(hint) -> str:
    if hint == TextSource or hint is TextSource:
        return "'demo', a file path, a list of file paths, or a dataset {path, name, split, text_field}"
    return str(hint)


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key} is {value}: must be > 0")


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} is {value!r}: valid values are {', '.join(map(repr, allowed))}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and Path(name).exists()


def _check_source(key: str, source: TextSource) -> None:
    if isinstance(source, DatasetSpec):
        source.check(key)
        return
    files = [source] if isinstance(source, str) else source
    if not files:
        raise ConfigError(f"{key} is an empty list: give 'demo', a text file or a list of text files")
    if files == ["demo"]:
        return
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"{key}: text file '{f}' not found (give 'demo', existing text files, "
                              "or a dataset {path, name, split, text_field})")
