"""The embedded default model: a tiny GQA Llama pretrained offline on Python's standard library sources.

The stdlib is text that exists wherever Python does, so the whole pipeline can run with no network,
no hub model and no dataset download. The corpus is recorded in a manifest (Python version and a
content hash) because the stdlib differs between Python versions, and so does the model trained on it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.config import DemoParams
from pipeline.train import train_causal_lm

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Test suites are skipped because they are full of deliberately odd code (lib2to3's test data
# lives under lib2to3/tests/data and includes files that are not even valid Python);
# site-packages is whatever happens to be installed, so it would make the corpus machine-dependent.
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
_MAX_FILE_BYTES = 200_000  # a few generated tables and huge modules would dominate a small budget
_EVAL_MODULUS = 10  # about 1 file in 10 is held out


def stdlib_corpus(train_bytes: int, eval_bytes: int) -> tuple[list[str], list[str], dict]:
    """Train and eval documents (one per stdlib .py file), split by file, plus a manifest.

    A file is held out for eval when sha256(relative path) % 10 == 0, so the split of a given
    file never depends on the budgets. Files are taken in sorted path order until each side has
    at least its byte budget (counted in UTF-8 bytes).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    budgets = {"train": train_bytes, "eval": eval_bytes}
    docs: dict[str, list[str]] = {"train": [], "eval": []}
    sizes = {"train": 0, "eval": 0}
    digest = hashlib.sha256()
    for rel, data in _stdlib_files(root):
        side = "eval" if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % _EVAL_MODULUS == 0 else "train"
        if sizes[side] >= budgets[side]:
            if all(sizes[s] >= budgets[s] for s in sizes):
                break
            continue
        docs[side].append(data.decode("utf-8"))
        sizes[side] += len(data)
        # Length-prefixed so that different (path, content) sequences cannot hash alike.
        for part in (rel.encode(), data):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    for side, name in (("train", "train_bytes"), ("eval", "eval_bytes")):
        if sizes[side] < budgets[side]:
            raise ValueError(
                f"the standard library at {root} has only {sizes[side]:,} bytes of usable .py source for "
                f"{side} but {name} = {budgets[side]:,} was asked; lower the budget "
                f"(demo.{'corpus_bytes' if side == 'train' else 'eval_bytes'} in params.yaml)")
    manifest = {
        "stdlib": str(root), "python": platform.python_version(),
        "train_files": len(docs["train"]), "eval_files": len(docs["eval"]),
        "train_bytes": sizes["train"], "eval_bytes": sizes["eval"],
        "sha256": digest.hexdigest(),
    }
    return docs["train"], docs["eval"], manifest


def _stdlib_files(root: Path):
    """(relative posix path, bytes) of usable .py files, in sorted path order."""
    paths = []
    # os.walk does not follow symlinked folders, so a link cannot pull in files outside the stdlib.
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        paths.extend(Path(folder, f) for f in files if f.endswith(".py"))
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in paths):
        if path.stat().st_size > _MAX_FILE_BYTES:
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        yield rel, data


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with specials <s>, </s>, <pad>; every string round-trips through encode/decode."""
    tok = Tokenizer(models.BPE())
    # No prefix space and no normaliser: anything added on encode would not come back on decode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
        # All 256 byte symbols, seen or not, so no input can ever be out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    # Cleaning up "tokenization spaces" would rewrite e.g. " ," and break the round trip.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def demo_model_config(p: DemoParams, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.seq_len, rms_norm_eps=1e-5,
        # Tied embeddings: at this size an untied output matrix would be a quarter of the model.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def pretrain_demo(p: DemoParams, train_sequences: torch.LongTensor, tokenizer,
                  on_step: Callable[[int, dict], None] | None = None, checkpoint: Path | None = None,
                  checkpoint_every: int = 0) -> tuple[LlamaForCausalLM, list[float]]:
    """Build the demo model from seed `p.seed` and pretrain it; returns (model in eval mode, step losses).

    With `checkpoint`, the training state is saved there every `checkpoint_every` steps and a call
    that finds it continues from it, ending with the weights an uninterrupted call would give
    (`train.train_causal_lm`); the caller owns the file and removes it when done."""
    if train_sequences.dim() != 2 or train_sequences.shape[1] > p.seq_len:
        raise ValueError(f"train_sequences must be (n, length) with length <= demo.seq_len ({p.seq_len}), "
                         f"got shape {tuple(train_sequences.shape)}")
    torch.manual_seed(p.seed)
    model = LlamaForCausalLM(demo_model_config(p, tokenizer))
    losses = train_causal_lm(model, train_sequences, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                             warmup_steps=min(50, p.steps // 10), seed=p.seed, on_step=on_step,
                             checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    return model.eval(), losses
