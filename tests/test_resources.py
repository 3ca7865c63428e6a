"""Stage estimates against what is really written, and the disk refusal."""
import pytest
import torch

from pipeline.errors import ResourceError
from pipeline.model.structure import MODULE_TYPES, structure_of
from pipeline.pruning.database import build_database, obs_unit_heads
from pipeline.pruning.sizes import database_output_bytes
from pipeline.run.resources import require_disk


@pytest.mark.parametrize("attn_unit,mlp_unit", [("query", 1), ("kv_group", 4)])
def test_database_size_estimate_matches_the_files_written(tiny_model, tokens, tmp_path, attn_unit, mlp_unit):
    structure = structure_of(tiny_model)
    build_database(tiny_model, structure, tokens, 4, 0.01, tmp_path, {}, batch_size=6, attn_unit=attn_unit,
                   mlp_unit=mlp_unit)
    written = sum(f.stat().st_size for f in tmp_path.glob("layer_*.safetensors"))
    per_unit = {m: obs_unit_heads(structure, m, attn_unit, mlp_unit) for m in MODULE_TYPES}
    estimate = database_output_bytes(structure, 4, torch.float32.itemsize, per_unit)
    assert 0.8 * written <= estimate <= written  # the files add headers the estimate leaves out


def test_a_disk_too_small_is_refused_naming_both_sizes(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(100 * 2**30, 99 * 2**30, 2**30))
    with pytest.raises(ResourceError, match=r"the layer database needs about 3.00 GiB .* which has 1.00 GiB free"):
        require_disk(tmp_path / "not" / "yet", 3 * 2**30, "the layer database")
    require_disk(tmp_path, 2**29, "a small output")
