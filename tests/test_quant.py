"""File-size search machinery (pipeline/quant, pipeline/search/joint.py), checked against independent
computations: the byte count against the written file, the quantizer against llama.cpp's own files, the
search's quantized model against llama.cpp's logits of the exported file, the byte search's invariants."""
import random

import gguf
import numpy as np
import pytest
import torch
from helpers import byte_level_tokenizer, tiny_llama

from pipeline.config import parse_budget
from pipeline.model.gguf_export import write_gguf
from pipeline.model.materialize import materialize
from pipeline.model.structure import structure_of
from pipeline.pruning.database import Database, build_database
from pipeline.quant.budget import LAYER_GENES, export_types, file_layout
from pipeline.quant.export import write_typed_gguf
from pipeline.quant.importance import column_importance, export_importance
from pipeline.quant.types import effective_type, tensor_bytes

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (requirements-eval.txt)")
pytestmark = needs_llama_cpp
LADDER = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny GQA Llama whose widths exercise both block sizes: hidden 256 (K-quants fit), head_dim 64,
    MLP 512 in units of 64 (pruned widths 448, 384, ... mostly not multiples of 256: fallbacks), its
    database, importance and file layout."""
    model = tiny_llama(layers=3, heads=4, kv_heads=2, hidden=256, intermediate=512, vocab=320)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)
    tokens = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("db")
    build_database(model, structure_of(model), tokens, 4, 0.01, out, {}, mlp_unit=64)
    db = Database(out)
    tokenizer = byte_level_tokenizer()
    layout = file_layout(db, model, tokenizer, out / "header.gguf")
    importance = column_importance(model, tokens)
    return model, db, tokenizer, layout, importance, tokens


def random_genotype(layout, layers, levels, rng):
    types = {g: [rng.choice(LADDER) for _ in range(layers)] for g in LAYER_GENES}
    types["embd"], types["output"] = [rng.choice(LADDER)], [rng.choice(LADDER)]
    return {"attn": [rng.randint(0, levels) for _ in range(layers)],
            "mlp": [rng.randint(0, levels) for _ in range(layers)], "types": types}


def export(setting, genotype, path):
    model, db, tokenizer, layout, importance, _ = setting
    pruned = materialize(model, db.structure, db.weights_for(genotype))
    name = f"a model named at length {len(str(path))}"  # the name's length is part of the metadata's size
    report = write_typed_gguf(pruned, tokenizer, path, export_types(layout, genotype),
                              export_importance(importance, db, genotype, layout.tied), name=name)
    return pruned, report


def test_byte_count_equals_the_written_file(setting, tmp_path):
    model, db, _, layout, _, _ = setting
    rng = random.Random(0)
    for i in range(4):
        genotype = random_genotype(layout, 3, db.levels, rng)
        genotype["attn"][1] = db.levels if i == 0 else genotype["attn"][1]  # a removed attention, a removed MLP
        genotype["mlp"][2] = db.levels if i == 1 else genotype["mlp"][2]
        path = tmp_path / f"g{i}.gguf"
        _, report = export(setting, genotype, path)
        assert path.stat().st_size == layout.named(f"a model named at length {len(str(path))}").file_bytes(genotype)
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:
            if t.name in report.tensor_types:  # every weight at the type the byte count assumed
                width = int(t.shape[0])
                assert t.tensor_type.name.lower() == report.tensor_types[t.name]
                assert report.tensor_types[t.name] == effective_type(export_types(layout, genotype)[t.name], width)


def test_quantizer_equals_llama_cpps_own_quantization(setting, tmp_path):
    """Every tensor of llama.cpp's q4_k_m / q3_k_m file equals our quantizer's bytes for the same f16 input
    and type (no importance: llama.cpp's quantizer without an imatrix)."""
    from pipeline.quant.ggml import quantize
    model, _, tokenizer, _, _, _ = setting
    f16 = tmp_path / "dense-f16.gguf"
    write_gguf(model, tokenizer, f16, "f16")
    source = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(f16).tensors}
    for ftype in ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M"):
        out = tmp_path / f"{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        assert llama_cpp.llama_model_quantize(bytes(f16), bytes(out), params) == 0
        kinds = set()
        for t in gguf.GGUFReader(out).tensors:
            name = t.tensor_type.name.lower()
            if name in ("f32", "f16"):
                continue
            kinds.add(name)
            assert np.array_equal(quantize(source[t.name], name).reshape(-1), np.array(t.data).reshape(-1)), t.name
        assert {"q4_k", "q6_k"} <= kinds or {"q3_k"} <= kinds


def test_importance_weights_lower_the_weighted_error():
    from pipeline.quant.ggml import roundtrip
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    imp = rng.random(256).astype(np.float32) ** 4
    for kind in ("q4_k", "q3_k", "q4_0", "iq4_nl"):
        plain = (((roundtrip(w, kind) - w) ** 2) * imp).sum()
        weighted = (((roundtrip(w, kind, imp) - w) ** 2) * imp).sum()
        assert weighted < plain, kind


def test_llama_cpp_runs_what_the_search_scored(setting, tmp_path):
    """The search's dense-shaped model with quantized-and-read-back tensors gives llama.cpp's logits of the
    exported file (f32 KV cache: only float rounding differs), for a pruned, mixed-type genotype."""
    from pipeline.evaluate import llama_cpp_model
    from pipeline.search.joint import QuantSwapper
    model, db, _, layout, importance, _ = setting
    genotype = {"attn": [1, 2, 0], "mlp": [1, 0, 3],
                "types": {"q": ["q4_k", "q8_0", "q3_k"], "k": ["q6_k", "q4_k", "q8_0"], "v": ["q3_k", "q5_k", "q4_k"],
                          "o": ["q4_k", "q3_k", "q5_k"], "gate": ["q5_k", "q4_k", "q3_k"],
                          "up": ["q4_k", "q6_k", "q4_k"], "down": ["q3_k", "q4_k", "q6_k"],
                          "embd": ["q4_k"], "output": ["q5_k"]}}
    path = tmp_path / "mixed.gguf"
    export(setting, genotype, path)
    import copy
    swapper = QuantSwapper(copy.deepcopy(model), db, layout, importance, 2**28)
    swapper.apply(genotype)
    ids = [1, 17, 250, 33, 5, 99, 120, 7, 64, 200, 11, 3]
    with torch.no_grad():
        ours = swapper.model(torch.tensor([ids])).logits[0].double().numpy()
    llm = llama_cpp_model(path, n_ctx=32, n_batch=32, n_ubatch=32, n_threads=1, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    scale = np.abs(ours).max()
    assert np.abs(ours - theirs).max() < 2e-2 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    # and the quantization mattered: the plain pruned model differs by far more
    with torch.no_grad():
        plain = materialize(model, db.structure, db.weights_for(genotype))(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(plain - theirs).max() > 5 * np.abs(ours - theirs).max()


@pytest.mark.parametrize("value,kind", [(80_000_000, "bytes"), ("75MB", "bytes"), ("72MiB", "bytes"), (0.35, "fraction"),
                                        ("q4_k_m", "preset")])
def test_budgets_parse(value, kind):
    assert parse_budget(value)[0] == kind


@pytest.mark.parametrize("value", ["75 furlongs", 1.5, 0, -3, True, "q9_k"])
def test_bad_budgets_are_refused(value):
    with pytest.raises(ValueError, match="llama.cpp preset"):
        parse_budget(value)


def test_tensor_bytes_match_gguf_sizes():
    for kind, (block, size) in (("q4_k", (256, 144)), ("q8_0", (32, 34)), ("iq4_nl", (32, 18))):
        assert tensor_bytes((3, 2 * block), kind) == 3 * 2 * size


def space_for(setting, ladder, move_levels, budget_fraction):
    from pipeline.search.joint import Space, ladder_order, uniform_genotype
    _, db, _, layout, _, _ = setting
    top = layout.file_bytes(uniform_genotype(layout, 3, 0, "q8_0"))
    return Space(layout, ladder_order(ladder), db.levels, move_levels, int(top * budget_fraction), 0.01)


@pytest.mark.parametrize("ladder,move_levels,fraction", [(LADDER, True, 0.45), (LADDER, False, 0.6),
                                                        (["q8_0"], True, 0.7)])
def test_byte_offspring_stay_in_the_band_on_their_axes(setting, ladder, move_levels, fraction):
    from pipeline.search.joint import byte_offspring, start_genotype
    space = space_for(setting, ladder, move_levels, fraction)
    rng = random.Random(0)
    start = start_genotype(space, 3, rng)
    assert space.within(start)
    children = byte_offspring(start, 12, space, rng, 3)
    assert len(children) >= 6
    for child in children:
        assert space.within(child) and child != start
        if not move_levels:
            assert child["attn"] == [0, 0, 0] and child["mlp"] == [0, 0, 0]
        if len(ladder) == 1:
            assert all(t == ladder[0] for v in child["types"].values() for t in v)


def test_an_unreachable_budget_is_refused(setting):
    from pipeline.search.joint import start_genotype
    space = space_for(setting, ["q8_0"], False, 0.5)  # dense q8_0 cannot halve without pruning
    with pytest.raises(ValueError, match="smallest genotype"):
        start_genotype(space, 3, random.Random(0))


def test_the_byte_search_improves_on_its_start_within_the_budget(setting):
    """A few generations of the joint search on the tiny model: every parent lies in the byte band, and the
    search ends with a lower KL on the whole fitness set than its start."""
    import copy

    from helpers import shipped

    from pipeline.config import SelectionStage
    from pipeline.search.evolution import evolve
    from pipeline.search.fitness import fitness, teacher_targets
    from pipeline.search.joint import QuantSwapper, byte_offspring, start_genotype
    model, db, _, layout, importance, tokens = setting
    space = space_for(setting, LADDER, True, 0.45)
    p = shipped("search", generations=4, offspring=6, tas=False, fitness="kl",
                schedule=(SelectionStage(survivors=2, fitness_tokens=128), SelectionStage(survivors=1, fitness_tokens=256)))
    teacher = teacher_targets(model, tokens, 8, "kl")
    swapper = QuantSwapper(copy.deepcopy(model), db, layout, importance, 2**28)
    start = start_genotype(space, 3, random.Random(0))
    swapper.apply(start)
    first = fitness(swapper.model, tokens, teacher, 8)
    parents = []
    state = evolve(swapper, start, p, tokens, teacher, on_generation=lambda r, parent: parents.append(parent),
                   propose=lambda parent, rng: byte_offspring(parent, p.offspring, space, rng, 3))
    assert all(space.within(g) for g in parents)
    swapper.apply(state.parent)
    assert fitness(swapper.model, tokens, teacher, 8) < first


def test_greedy_types_fit_the_budget_with_less_proxy_error_than_other_fits(setting):
    """The greedy allocation on the error proxy lands in the band, and no uniform or random genotype in the
    band has a lower summed proxy error (the knapsack it approximates)."""
    from pipeline.search.joint import calibrated_errors, greedy_types, start_genotype, tensor_errors, uniform_genotype
    model, db, _, layout, importance, tokens = setting
    import copy

    from pipeline.search.fitness import fitness, teacher_targets
    from pipeline.search.joint import QuantSwapper
    space = space_for(setting, LADDER, False, 0.6)
    swapper = QuantSwapper(copy.deepcopy(model), db, layout, importance, 2**28)
    teacher = teacher_targets(model, tokens, 8, "kl")
    errors = calibrated_errors(tensor_errors(swapper, space.ladder), space.ladder, swapper,
                               lambda: fitness(swapper.model, tokens, teacher, 8), 3)
    start = start_genotype(space, 3, random.Random(0), errors)
    assert space.within(start)

    def proxy(g):
        return sum(errors[(gene, i)][kind] for gene, kinds in g["types"].items() for i, kind in enumerate(kinds))
    greedy = greedy_types(uniform_genotype(layout, 3, 0, space.ladder[0]), space, errors)
    assert layout.file_bytes(greedy) <= space.high
    rng = random.Random(1)
    others = [start_genotype(space, 3, rng)]
    for _ in range(20):  # random descents from the top type until as small as the greedy one
        g = uniform_genotype(layout, 3, 0, space.ladder[0])
        while layout.file_bytes(g) > layout.file_bytes(greedy):
            gene = rng.choice(list(g["types"]))
            i = rng.randrange(len(g["types"][gene]))
            at = space.ladder.index(g["types"][gene][i])
            g["types"][gene][i] = space.ladder[min(at + 1, len(space.ladder) - 1)]
        others.append(g)
    assert all(proxy(greedy) <= proxy(g) + 1e-12 for g in others)
