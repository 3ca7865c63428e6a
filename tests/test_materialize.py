"""Levels materialised as pruned models (pipeline/model/materialize.py, pruned_llama.py): dense-level
equality, masked-vs-shrunk equality, removed modules without parameters."""

import pytest
import torch
from helpers import masked_copy as _masked_copy
from helpers import tiny_llama

from pipeline.model.materialize import materialize
from pipeline.model.structure import ATTN, MLP, ModelStructureError, structure_of
from pipeline.pruning.database import Database, build_database


@pytest.fixture(scope="module")
def database(tmp_path_factory):  # read-only: built once for the module's tests
    model, out = tiny_llama(), tmp_path_factory.mktemp("db")
    tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))
    build_database(model, structure_of(model), tokens, levels=4, damp=0.01, out_dir=out, identity={}, batch_size=5)
    return Database(out)


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
        kept_heads = database.kept_count(ATTN, levels[ATTN][i])
        assert layer.self_attn.num_heads == kept_heads == len(pruned.config.layers[i]["q_heads"])
        if kept_heads:
            assert layer.self_attn.q_proj.out_features == kept_heads * 8
        assert layer.mlp.intermediate_size == database.kept_count(MLP, levels[MLP][i]) == pruned.config.layers[i]["mlp"]


def test_orphaned_kv_heads_are_removed(tiny_model, database, tokens):
    levels = {ATTN: [2, 2, 2], MLP: [0, 0, 0]}  # 2 of 4 query heads left per layer
    pruned = materialize(tiny_model, database.structure, database.weights_for(levels))
    for i, layer in enumerate(pruned.model.layers):
        q, kv = pruned.config.layers[i]["q_heads"], pruned.config.layers[i]["kv_heads"]
        assert kv == sorted({h // 2 for h in q})
        assert layer.self_attn.k_proj.out_features == len(kv) * 8


def test_model_without_llama_blocks_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ModelStructureError, match="Llama block layout"):
        structure_of(model)


FAMILIES = ["llama", "llama_mha", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_to_a_shrunk_model_equal_to_the_masked_one(family, tokens, tmp_path):
    from helpers import tiny_family
    model = tiny_family(family)
    structure = structure_of(model)
    build_database(model, structure, tokens, 4, 0.01, tmp_path, {}, batch_size=6)
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
    build_database(tiny_model, structure, tokens, 2, 0.01, tmp_path, {}, batch_size=6, attn_unit="kv_group",
                   mlp_unit=4)
    db = Database(tmp_path)
    assert [db.kept_count(ATTN, k) for k in range(3)] == [4, 2, 0]
    assert [db.kept_count(MLP, k) for k in range(3)] == [24, 12, 0]
    levels = {ATTN: [1, 2, 0], MLP: [2, 1, 0]}  # layer 1 loses every head, layer 0 every neuron
    pruned = materialize(tiny_model, structure, db.weights_for(levels))
    torch.testing.assert_close(pruned(tokens).logits, _masked_copy(tiny_model, db, levels)(tokens).logits,
                               rtol=1e-5, atol=1e-5)
    for layer, record in enumerate(pruned.config.layers):
        q, kv = record["q_heads"], record["kv_heads"]
        assert len(q) == 2 * len(kv) and sorted({h // 2 for h in q}) == kv  # complete groups only
        if q:
            assert pruned.model.layers[layer].self_attn.num_key_value_groups in (1, 2)
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 8  # one kv head of 8 dims left
    neurons = db.level_weight(1, MLP, 1)[0]
    assert len(neurons) == 12 and all(int(b) % 4 == 0 for b in neurons[::4])  # blocks of 4 neurons
    assert all(torch.equal(neurons[i:i + 4], neurons[i] + torch.arange(4)) for i in range(0, 12, 4))


def test_removed_modules_hold_no_parameters(tiny_model, database, tokens):
    from pipeline.model.pruned_llama import RemovedAttention, RemovedMLP
    levels = {ATTN: [4, 1, 0], MLP: [0, 4, 2]}  # layer 0 without heads, layer 1 without neurons
    pruned = materialize(tiny_model, database.structure, database.weights_for(levels))
    assert isinstance(pruned.model.layers[0].self_attn, RemovedAttention)
    assert isinstance(pruned.model.layers[1].mlp, RemovedMLP)
    assert list(pruned.model.layers[0].self_attn.parameters()) == []
    assert list(pruned.model.layers[1].mlp.parameters()) == []
    assert list(pruned.model.layers[0].input_layernorm.parameters()) == []  # it would feed nothing
    assert list(pruned.model.layers[1].post_attention_layernorm.parameters()) == []
    pruned.train()
    pruned(tokens[:2]).logits.sum().backward()
    assert all(p.numel() > 0 and p.grad is not None for p in pruned.parameters())  # DDP needs no special case
    pruned.eval()
    prompt = tokens[:1, :5]
    assert torch.equal(pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True),
                       pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_level_zero_equals_the_dense_model_exactly(dtype, tokens, tmp_path):
    from helpers import tiny_llama
    from transformers import AutoModelForCausalLM
    tiny_llama().save_pretrained(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    rotary = dense.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32  # as Hugging Face loads half-precision models
    structure = structure_of(dense)
    everything = {}
    for i, layer in enumerate(dense.model.layers):
        everything[(i, ATTN)] = (torch.arange(structure.num_heads), layer.self_attn.o_proj.weight)
        everything[(i, MLP)] = (torch.arange(structure.intermediate_size), layer.mlp.down_proj.weight)
    pruned = materialize(dense, structure, everything)
    assert {p.dtype for p in pruned.parameters()} == {dtype}
    for name in ("inv_freq", "original_inv_freq"):
        assert pruned.model.rotary_emb.get_buffer(name).dtype == torch.float32
        assert torch.equal(pruned.model.rotary_emb.get_buffer(name), rotary.get_buffer(name))
    with torch.no_grad():
        assert torch.equal(pruned(tokens).logits, dense(tokens).logits)
