"""The layer database (pipeline/pruning/database.py): Hessians streamed block by block equal the full
forward ones, builds resume to identical files, and a database refuses models and files it was not built for."""
import pytest
import torch
from helpers import tiny_family, tiny_llama

from pipeline.errors import DatabaseError
from pipeline.model.structure import ATTN, MLP, structure_of
from pipeline.pruning.block_stream import BlockRunner
from pipeline.pruning.database import Database, block_hessians, build_database, module_file
from pipeline.run.distributed import SINGLE
from pipeline.run.hashing import file_sha256, model_fingerprint


def test_corrupted_or_foreign_database_is_refused(tiny_model, tokens, tmp_path):
    structure = structure_of(tiny_model)
    build_database(tiny_model, structure, tokens, 4, 0.01, tmp_path, {
        "model": "tiny", "model_fingerprint": model_fingerprint(tiny_model)}, batch_size=6)
    db = Database(tmp_path)
    db.check_model(tiny_llama())  # the same weights rebuilt: accepted
    with pytest.raises(DatabaseError, match="built for another model"):
        db.check_model(tiny_llama(seed=1))
    data = bytearray((tmp_path / module_file(1, ATTN)).read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / module_file(1, ATTN)).write_bytes(bytes(data))
    fresh = Database(tmp_path)
    fresh.level_weight(0, ATTN, 1)  # an intact layer still loads
    with pytest.raises(DatabaseError, match=r"layer_001.attn.safetensors' is corrupted \(checksum mismatch\)"):
        fresh.level_weight(1, ATTN, 1)


def test_interrupted_database_build_resumes_to_identical_files(tiny_model, tokens, tmp_path):
    structure = structure_of(tiny_model)
    reference = build_database(tiny_model, structure, tokens, 4, 0.01, tmp_path / "ref", {}, batch_size=6)

    class Killed(Exception):
        pass

    def die_after_layer_2_attn(layer, module, losses):  # its file is written, layer 2's MLP is not
        if (layer, module) == (2, ATTN):
            raise Killed
    with pytest.raises(Killed):
        build_database(tiny_model, structure, tokens, 4, 0.01, tmp_path / "work", {}, batch_size=6,
                       on_module=die_after_layer_2_attn)
    finished = []
    resumed = build_database(tiny_model, structure, tokens, 4, 0.01, tmp_path / "work", {}, batch_size=6,
                             on_module=lambda layer, module, losses: finished.append((layer, module)))
    assert finished == [(2, MLP)]  # only the missing module was computed
    assert resumed == reference
    for i in range(3):
        for module in (ATTN, MLP):
            name = module_file(i, module)
            assert file_sha256(tmp_path / "work" / name) == file_sha256(tmp_path / "ref" / name)


def _hessians_from_full_forward(model, tokens):
    """Reference: hooks on every o_proj/down_proj during ordinary full-model forward passes."""
    sums, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for module, proj in ((ATTN, layer.self_attn.o_proj), (MLP, layer.mlp.down_proj)):
            def hook(_m, inputs, _out, key=(i, module)):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
            hooks.append(proj.register_forward_hook(hook))
    with torch.no_grad():
        for batch in torch.split(tokens, 5):
            model(input_ids=batch)
    for h in hooks:
        h.remove()
    return {key: h / tokens.numel() for key, h in sums.items()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("spill", [False, True])
def test_block_by_block_hessians_equal_the_full_forward_ones(family, spill, tokens, tmp_path):
    model = tiny_family(family, layers=3)
    reference = _hessians_from_full_forward(model, tokens)
    runner = BlockRunner(model, tokens, 5, torch.device("cpu"), tmp_path / "states.bin" if spill else None)
    for layer in range(3):
        got = block_hessians(runner, SINGLE, torch.float64, tokens.numel())
        for module in (ATTN, MLP):
            torch.testing.assert_close(got[module], reference[(layer, module)], rtol=1e-5, atol=1e-7)
    assert (tmp_path / "states.bin").is_file() == spill
