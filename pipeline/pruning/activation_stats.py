"""What the baseline methods need from the calibration set, in one pass through the dense model streamed
block by block (`block_stream.py`): per-column statistics of every output projection's input (sum and sum
of squares, for Wanda-sp and FLAP) and every block's influence (ShortGPT: the mean over tokens of
1 - cos(block input, block output)). Summed over every rank's calibration shard."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model.structure import MODULE_TYPES, output_projection
from pipeline.pruning.block_stream import BlockRunner
from pipeline.pruning.scores import ChannelStats, cosine_influence
from pipeline.run.distributed import SINGLE, Group


@dataclass
class CalibrationStats:
    channels: dict  # (layer, module) -> ChannelStats of the output projection's input
    block_influence: list[float]  # per layer
    tokens: int


@torch.no_grad()
def calibration_stats(model, calib: torch.Tensor, batch_size: int = 8, group: Group = SINGLE,
                      spill_file=None, on_layer=None) -> CalibrationStats:
    """Stream `calib` (this rank's shard of it) through `model` block by block and gather the statistics."""
    runner = BlockRunner(model, group.shard(calib), batch_size, group.device, spill_file)
    layers = len(model.model.layers)
    channels, influence = {}, []
    for layer in range(layers):
        sums = _advance_with_sums(runner, model, keep_outputs=layer < layers - 1)
        for module in MODULE_TYPES:
            total, squares = (group.all_reduce_sum_(t.to(group.device)).cpu() for t in sums[module])
            channels[(layer, module)] = ChannelStats(total, squares, calib.numel())
        influence_sum = sums["influence"].reshape(1).to(group.device, torch.float64)
        influence.append(float(group.all_reduce_sum_(influence_sum)) / calib.numel())
        if on_layer:
            on_layer(layer)
    return CalibrationStats(channels, influence, calib.numel())


def _advance_with_sums(runner: BlockRunner, model, keep_outputs: bool) -> dict:
    """Run the runner's next block; {module: (sum, sum of squares) of its projection's input columns,
    "influence": the sum over tokens of 1 - cos(block input, block output)} on this rank."""
    layer = runner.next_block
    sums: dict = {}

    def accumulate(module):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            total, squares = sums.get(module, (0, 0))
            sums[module] = (total + x.sum(0), squares + (x**2).sum(0))
        return hook

    def block_hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        sums["influence"] = sums.get("influence", 0) + cosine_influence(x, y).sum()

    hooks = [output_projection(model, layer, m).register_forward_hook(accumulate(m)) for m in MODULE_TYPES]
    hooks.append(model.model.layers[layer].register_forward_hook(block_hook, with_kwargs=True))
    try:
        runner.advance(keep_outputs)
    finally:
        for h in hooks:
            h.remove()
    return sums
