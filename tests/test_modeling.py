"""Database levels applied to models: dense-level equality and masked-vs-shrunk equality."""
import json

import pytest
import torch

from pipeline.database import Database, build_database, collect_hessians
from conftest import masked_copy as _masked_copy
from pipeline.modeling import ATTN, MLP, ModelStructureError, materialize, structure_of


@pytest.fixture
def database(tiny_model, tokens, tmp_path):
    structure = structure_of(tiny_model)
    hessians = collect_hessians(tiny_model, structure, tokens, batch_size=5)
    build_database(tiny_model, structure, hessians, levels=4, damp=0.01, out_dir=tmp_path / "db", identity={})
    return Database(tmp_path / "db")


def test_level_zero_reproduces_dense_logits(tiny_model, database, tokens):
    levels = {ATTN: [0, 0, 0], MLP: [0, 0, 0]}
    pruned = materialize(tiny_model, database.structure, database.weights_for(levels))
    torch.testing.assert_close(pruned(tokens).logits, tiny_model(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [
    {ATTN: [1, 2, 3], MLP: [3, 1, 2]},
    {ATTN: [4, 1, 0], MLP: [0, 4, 2]},  # a layer with no heads at all, a layer with no neurons
    {ATTN: [3, 3, 3], MLP: [2, 2, 2]},
])
def test_shrunk_model_equals_zeroed_dense_model(tiny_model, database, tokens, levels):
    pruned = materialize(tiny_model, database.structure, database.weights_for(levels))
    masked = _masked_copy(tiny_model, database, levels)
    torch.testing.assert_close(pruned(tokens).logits, masked(tokens).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned(tokens).logits, tiny_model(tokens).logits, atol=1e-3)
    for i, layer in enumerate(pruned.model.layers):
        kept_heads = database.kept_units(ATTN, levels[ATTN][i])
        assert layer.self_attn.q_proj.out_features == kept_heads * 8
        assert layer.mlp.down_proj.in_features == database.kept_units(MLP, levels[MLP][i])


def test_orphaned_kv_heads_are_removed(tiny_model, database, tokens):
    levels = {ATTN: [2, 2, 2], MLP: [0, 0, 0]}  # 2 of 4 query heads left per layer
    pruned = materialize(tiny_model, database.structure, database.weights_for(levels))
    for i, layer in enumerate(pruned.model.layers):
        q = pruned.config.layer_q_heads[i]
        assert pruned.config.layer_kv_heads[i] == sorted({h // 2 for h in q})
        assert layer.self_attn.k_proj.out_features == len(pruned.config.layer_kv_heads[i]) * 8


def test_model_without_llama_blocks_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ModelStructureError, match="Llama block layout"):
        structure_of(model)


FAMILIES = ["llama", "llama_mha", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_to_a_shrunk_model_equal_to_the_masked_one(family, tokens, tmp_path):
    from conftest import tiny_family
    model = tiny_family(family)
    structure = structure_of(model)
    build_database(model, structure, collect_hessians(model, structure, tokens, 6), 4, 0.01, tmp_path, {})
    db = Database(tmp_path)
    dense_levels = {ATTN: [0, 0], MLP: [0, 0]}
    torch.testing.assert_close(materialize(model, structure, db.weights_for(dense_levels))(tokens).logits,
                               model(tokens).logits, rtol=1e-5, atol=1e-5)
    levels = {ATTN: [1, 4], MLP: [4, 2]}
    pruned = materialize(model, structure, db.weights_for(levels))
    torch.testing.assert_close(pruned(tokens).logits, _masked_copy(model, db, levels)(tokens).logits,
                               rtol=1e-5, atol=1e-5)
    assert pruned.config.source_model_type == model.config.model_type


def test_kv_group_units_remove_whole_groups_and_shrink_the_kv_cache(tiny_model, tokens, tmp_path):
    structure = structure_of(tiny_model)  # 4 query heads, 2 kv heads: groups of 2
    hessians = collect_hessians(tiny_model, structure, tokens, 6)
    build_database(tiny_model, structure, hessians, 2, 0.01, tmp_path, {}, attn_unit="kv_group", mlp_unit=4)
    db = Database(tmp_path)
    assert [db.kept_units(ATTN, k) for k in range(3)] == [4, 2, 0]
    assert [db.kept_units(MLP, k) for k in range(3)] == [24, 12, 0]
    levels = {ATTN: [1, 2, 0], MLP: [2, 1, 0]}  # layer 1 loses every head, layer 0 every neuron
    pruned = materialize(tiny_model, structure, db.weights_for(levels))
    torch.testing.assert_close(pruned(tokens).logits, _masked_copy(tiny_model, db, levels)(tokens).logits,
                               rtol=1e-5, atol=1e-5)
    for layer, (q, kv) in enumerate(zip(pruned.config.layer_q_heads, pruned.config.layer_kv_heads)):
        assert len(q) == 2 * len(kv) and sorted({h // 2 for h in q}) == kv  # complete groups only
        assert pruned.model.layers[layer].self_attn.num_key_value_groups in (1, 2)
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 8  # one kv head of 8 dims left
    neurons = db.level_weight(1, MLP, 1)[0]
    assert len(neurons) == 12 and all(int(b) % 4 == 0 for b in neurons[::4])  # blocks of 4 neurons
    assert all(torch.equal(neurons[i:i + 4], neurons[i] + torch.arange(4)) for i in range(0, 12, 4))


def test_corrupted_or_foreign_database_is_refused(tiny_model, tokens, tmp_path):
    from conftest import tiny_llama
    from pipeline.database import DatabaseError, model_fingerprint
    structure = structure_of(tiny_model)
    build_database(tiny_model, structure, collect_hessians(tiny_model, structure, tokens, 6), 4, 0.01, tmp_path, {
        "model": "tiny", "model_fingerprint": model_fingerprint(tiny_model)})
    db = Database(tmp_path)
    db.check_model(tiny_llama())  # the same weights rebuilt: accepted
    with pytest.raises(DatabaseError, match="built for another model"):
        db.check_model(tiny_llama(seed=1))
    data = bytearray((tmp_path / "layer_001.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "layer_001.safetensors").write_bytes(bytes(data))
    fresh = Database(tmp_path)
    fresh.level_weight(0, ATTN, 1)  # an intact layer still loads
    with pytest.raises(DatabaseError, match=r"layer_001.safetensors' is corrupted \(checksum mismatch\)"):
        fresh.level_weight(1, ATTN, 1)


def test_interrupted_database_build_resumes_to_identical_files(tiny_model, tokens, tmp_path):
    from pipeline.database import PROGRESS, file_sha256
    structure = structure_of(tiny_model)
    hessians = collect_hessians(tiny_model, structure, tokens, 6)
    reference = build_database(tiny_model, structure, hessians, 4, 0.01, tmp_path / "ref", {})

    class Killed(Exception):
        pass

    def die_in_layer_2(layer, module, losses):
        if layer == 2:
            raise Killed
    with pytest.raises(Killed):
        build_database(tiny_model, structure, hessians, 4, 0.01, tmp_path / "work", {}, on_module=die_in_layer_2)
    assert sorted(json.loads((tmp_path / "work" / PROGRESS).read_text())) == ["0", "1"]
    finished = []
    resumed = build_database(tiny_model, structure, hessians, 4, 0.01, tmp_path / "work", {},
                             on_module=lambda layer, module, losses: finished.append(layer))
    assert finished == [2, 2]  # only the missing layer was computed
    assert resumed == reference and not (tmp_path / "work" / PROGRESS).exists()
    for i in range(3):
        name = f"layer_{i:03d}.safetensors"
        assert file_sha256(tmp_path / "work" / name) == file_sha256(tmp_path / "ref" / name)
