"""The presets in configs/ are valid params files and their targets give the paper's model sizes,
computed from each architecture's published shape (no weights needed)."""
from pathlib import Path

import pytest
from helpers import ROOT

from pipeline.config import load_params
from pipeline.model.structure import Structure
from pipeline.pruning.obs import removal_counts
from pipeline.search.evolution import uniform_levels

# name: (shape from the model's config.json, embedding + LM head parameters, paper's pruned size)
PRESETS = {
    "llama-2-7b-to-2.7b": (Structure(32, 4096, 32, 32, 128, 11008), 2 * 32000 * 4096, 2.7e9),
    "llama-3.1-8b-to-4.6b": (Structure(32, 4096, 32, 8, 128, 14336), 2 * 128256 * 4096, 4.6e9),
    "qwen2.5-14b-instruct-to-8.4b": (Structure(48, 5120, 40, 8, 128, 13824), 2 * 152064 * 5120, 8.4e9),
}


def _size_bounds(structure: Structure, levels: dict, k: int, outside: int) -> tuple[int, int]:
    """Model size at uniform levels: fewest kv heads (whole groups removed) and most (none orphaned)."""
    low = high = outside
    q_left = [structure.num_heads - c for c in removal_counts(structure.num_heads, k)]
    neurons_left = [structure.intermediate_size - c for c in removal_counts(structure.intermediate_size, k)]
    for attn, mlp in zip(levels["attn"], levels["mlp"]):
        q = q_left[attn]
        fewest_kv = -(-q // structure.group_size)
        low += structure.attention_params(q, fewest_kv) + structure.mlp_params(neurons_left[mlp])
        high += structure.attention_params(q, min(q, structure.num_kv_heads)) + structure.mlp_params(neurons_left[mlp])
    return low, high


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_valid_and_reaches_the_papers_size(name):
    params = load_params(ROOT / "configs" / f"{name}.yaml")
    structure, outside, paper = PRESETS[name]
    levels = uniform_levels(params.search.target, params.database.levels, structure.num_layers)
    low, high = _size_bounds(structure, levels, params.database.levels, outside)
    assert low <= high
    assert abs(low / paper - 1) < 0.03 and abs(high / paper - 1) < 0.05, (low, high, paper)
    assert params.data.seq_len == 4096 and params.compute.nproc > 1
    assert params.finetune.batch_size % params.compute.nproc == 0


SMALL_PRESETS = {"smollm2-135m-cpu", "stories260k-cpu"}  # runs the whole pipeline on a CPU: checked end to end, not against a paper


def test_every_preset_is_tested():
    assert {p.stem for p in Path(ROOT / "configs").glob("*.yaml")} == set(PRESETS) | SMALL_PRESETS


def test_smollm2_preset_fits_its_data_and_the_2_core_machine():
    params = load_params(ROOT / "configs" / "smollm2-135m-cpu.yaml")
    assert params.model.name_or_path.endswith(".gguf") and params.compute.device == "cpu"
    assert params.finetune.steps * params.finetune.batch_size * params.data.seq_len <= params.data.train_tokens
    assert params.database.mlp_unit == 32  # quantized GGUF rows need widths divisible by 32
    assert params.evaluate.lm_eval_include_path == "configs/lm_eval_tasks"
    assert (ROOT / "configs" / "lm_eval_tasks" / "story_ending.yaml").is_file()
