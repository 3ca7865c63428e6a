"""Run a decoder model block by block over a fixed set of sequences, so that a model larger than
the accelerator still yields every block's dense activations: only the block being run is on the
device; the hidden states of all sequences live in CPU memory or in a file on disk, and each
block's outputs overwrite its inputs in place.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class _ReachedFirstBlock(Exception):
    pass


class BlockRunner:
    """Hidden states of `sequences` at the input of block `self.next_block`; `advance()` runs
    that block over all of them. The blocks' call arguments other than the hidden states (rotary
    embeddings, causal mask, positions) are captured from the model's own forward pass once per
    batch size, so every architecture with the Llama block layout is run exactly as its
    model class runs it."""

    def __init__(self, model, sequences: torch.Tensor, batch_size: int, device: torch.device,
                 spill_file: Path | None = None):
        self.model, self.batch_size, self.device = model, batch_size, torch.device(device)
        self.layers = model.model.layers
        n, seq_len = sequences.shape
        self.states = _allocate((n, seq_len, model.config.hidden_size), model.dtype, spill_file)
        self._block_kwargs: dict[int, dict] = {}
        self.next_block = 0
        stem = [model.model.embed_tokens, model.model.rotary_emb]
        with _on(stem, self.device):
            for start in range(0, n, batch_size):
                hidden, kwargs = self._catch(sequences[start:start + batch_size].to(self.device))
                self.states[start:start + len(hidden)] = hidden.to("cpu", self.states.dtype)
                self._block_kwargs.setdefault(len(hidden), kwargs)

    @torch.no_grad()
    def _catch(self, batch: torch.Tensor):
        caught = {}

        def stop(_module, args, kwargs):
            caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _ReachedFirstBlock

        hook = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.model(input_ids=batch, use_cache=False)
        except _ReachedFirstBlock:
            pass
        finally:
            hook.remove()
        return caught["hidden"], caught["kwargs"]

    @torch.no_grad()
    def advance(self, keep_outputs: bool = True, again: bool = False) -> None:
        """Run block `next_block` over every sequence (the caller's hooks on it see all inputs).
        Without `keep_outputs` the states are left as they were (the last block's outputs are
        never needed); `again` runs the previous block once more instead (after the caller changed it:
        its inputs must still be the states, so its first run must not have kept its outputs)."""
        if again:
            self.next_block -= 1
        block = self.layers[self.next_block]
        with _on([block], self.device):
            for start in range(0, len(self.states), self.batch_size):
                x = self.states[start:start + self.batch_size].to(self.device)
                out = block(x, **self._block_kwargs[len(x)])
                if keep_outputs:
                    out = out[0] if isinstance(out, tuple) else out
                    self.states[start:start + len(x)] = out.to("cpu", self.states.dtype)
        self.next_block += 1


def activation_bytes(sequences: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    return sequences * seq_len * hidden * dtype.itemsize


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, spill_file: Path | None) -> torch.Tensor:
    if spill_file is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for size in shape:
        numel *= size
    spill_file.parent.mkdir(parents=True, exist_ok=True)
    with open(spill_file, "wb") as f:
        f.truncate(numel * dtype.itemsize)
    return torch.from_file(str(spill_file), shared=True, size=numel, dtype=dtype).view(shape)


@contextlib.contextmanager
def _on(modules, device: torch.device):
    """Move modules to the device for the duration, back to the CPU afterwards (no-op on CPU)."""
    if device.type == "cpu":
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
