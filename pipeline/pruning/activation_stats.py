"""What the baseline methods need from the calibration set, in one pass through the model streamed block
by block (`block_stream.py`): per-column statistics of every output projection's input (sum, sum of squares
and the per-sequence mean |x|: Wanda-sp, FLAP, CFSP, Minitron) and every block's influence (ShortGPT: the
mean over tokens of 1 - cos(block input, block output); CFSP: the mean of arccos(cos) / pi). Summed over
every rank's calibration shard.

Wanda-sp is sequential in its reference: each block is pruned before the next block's statistics are
taken. `prune_block` does that: called with a block's statistics, it prunes the block in place (by zeroing
output-projection columns), the block's outputs are computed again through the pruned block, and the
block's weights are restored before the pass moves on (the model is left as it was)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.model.structure import MODULE_TYPES, output_projection
from pipeline.pruning.block_stream import BlockRunner
from pipeline.pruning.scores import ChannelStats, angular_distance, cosine_influence
from pipeline.run.distributed import SINGLE, Group


@dataclass
class CalibrationStats:
    channels: dict  # (layer, module) -> ChannelStats of the output projection's input
    block_influence: list[float]  # per layer: mean over tokens of 1 - cos
    tokens: int
    block_angular: list[float] | None = None  # per layer: mean over tokens of arccos(cos) / pi


# prune_block(layer, {module: ChannelStats}) -> {module: columns of the output projection to zero}
BlockPruner = Callable[[int, dict], dict]


@torch.no_grad()
def calibration_stats(model, calib: torch.Tensor, batch_size: int = 8, group: Group = SINGLE,
                      spill_file=None, on_layer=None, prune_block: BlockPruner | None = None) -> CalibrationStats:
    """Stream `calib` (this rank's shard of it) through `model` block by block and gather the statistics;
    with `prune_block`, each block is pruned before its outputs feed the next block."""
    runner = BlockRunner(model, group.shard(calib), batch_size, group.device, spill_file)
    layers = len(model.model.layers)
    channels, influence, angular = {}, [], []
    for layer in range(layers):
        last = layer == layers - 1
        sums = _advance_with_sums(runner, model, keep_outputs=not last and prune_block is None)
        for module in MODULE_TYPES:
            total, squares, abs_means = (group.all_reduce_sum_(t.to(group.device)).cpu() for t in sums[module])
            channels[(layer, module)] = ChannelStats(total, squares, calib.numel(), abs_means)
        for name, out in (("influence", influence), ("angular", angular)):
            out.append(float(group.all_reduce_sum_(sums[name].reshape(1).to(group.device, torch.float64)))
                       / calib.numel())
        if prune_block is not None:
            removed = prune_block(layer, {m: channels[(layer, m)] for m in MODULE_TYPES})
            if not last:
                with _zeroed_columns(model, layer, removed):
                    runner.advance(keep_outputs=True, again=True)
        if on_layer:
            on_layer(layer)
    return CalibrationStats(channels, influence, calib.numel(), angular)


def _advance_with_sums(runner: BlockRunner, model, keep_outputs: bool) -> dict:
    """Run the runner's next block; {module: (sum, sum of squares, sum over sequences of the squared
    per-sequence mean |x|) of its projection's input columns, "influence" / "angular": the sums over tokens
    of 1 - cos and arccos(cos) / pi between the block's input and output} on this rank."""
    layer = runner.next_block
    sums: dict = {}

    def accumulate(module):
        def hook(_module, inputs, _output):
            x = inputs[0].to(torch.float64)
            flat = x.reshape(-1, x.shape[-1])
            per_sequence = x.abs().mean(-2).reshape(-1, x.shape[-1])  # (sequences, columns)
            previous = sums.get(module, (0, 0, 0))
            sums[module] = (previous[0] + flat.sum(0), previous[1] + (flat**2).sum(0),
                            previous[2] + (per_sequence**2).sum(0))
        return hook

    def block_hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        sums["influence"] = sums.get("influence", 0) + cosine_influence(x, y).sum()
        sums["angular"] = sums.get("angular", 0) + angular_distance(x, y).sum()

    hooks = [output_projection(model, layer, m).register_forward_hook(accumulate(m)) for m in MODULE_TYPES]
    hooks.append(model.model.layers[layer].register_forward_hook(block_hook, with_kwargs=True))
    try:
        runner.advance(keep_outputs)
    finally:
        for h in hooks:
            h.remove()
    return sums


@contextlib.contextmanager
def _zeroed_columns(model, layer: int, columns: dict):
    """Zero the given input columns of a block's output projections for the duration (a removed head or
    neuron then contributes nothing, as if it were cut out), restoring the weights afterwards."""
    saved = []
    for module, cols in columns.items():
        proj = output_projection(model, layer, module)
        cols = torch.as_tensor(cols, dtype=torch.long)
        saved.append((proj, cols, proj.weight.data[:, cols].clone()))
        proj.weight.data[:, cols] = 0
    try:
        yield
    finally:
        for proj, cols, original in saved:
            proj.weight.data[:, cols] = original
