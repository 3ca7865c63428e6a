"""The ordinary Hugging Face path on a real pretrained GQA Llama (stories260K) and real text:
loading, the database, one-shot pruning quality and a short search. Skips without ../shared/data."""
import pytest
import torch
from helpers import SHARED_DATA, shipped

from pipeline.config import ModelParams, SelectionStage
from pipeline.data import eval_set, read_documents, split_train_sets, token_stream
from pipeline.evaluate import perplexity
from pipeline.model.materialize import materialize
from pipeline.model.resolve import describe_model
from pipeline.model.structure import ATTN, MLP, load_dense, output_projection, structure_of
from pipeline.pruning.database import Database, build_database
from pipeline.search.evolution import LevelSwapper, evolve, uniform_levels
from pipeline.search.fitness import fitness, teacher_targets

MODEL = SHARED_DATA / "stories260K"
TEXT = SHARED_DATA / "tinystories"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file() or not TEXT.is_dir(),
                                reason="real test assets ../shared/data/{stories260K,tinystories} are absent")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, tokenizer = load_dense(str(MODEL))
    p = shipped("data", train=str(TEXT / "train_head.txt"), eval=str(TEXT / "dev.txt"), seq_len=256,
                calib_tokens=16384, fitness_tokens=4096, train_tokens=4096, eval_tokens=16384)
    sets = split_train_sets(token_stream(read_documents(p.train), tokenizer), p)
    evals = eval_set(token_stream(read_documents(p.eval), tokenizer), p)
    structure = structure_of(model)
    out = tmp_path_factory.mktemp("db")
    build_database(model, structure, sets["calib"], levels=8, damp=0.01, out_dir=out, identity={}, batch_size=16)
    return model, Database(out), sets, evals


def _magnitude_weights(model, db, levels, mlp_block=1):
    """Independent reference: the database's unit counts, but units chosen by the norm of their output
    columns and left uncorrected (heads, or blocks of `mlp_block` neurons)."""
    weights = {}
    for module in (ATTN, MLP):
        per_unit = 1 if module == ATTN else mlp_block
        for layer, level in enumerate(levels[module]):
            w = output_projection(model, layer, module).weight.detach()
            block = db.structure.unit_size(module) * per_unit  # columns per unit
            count = len(db.level_units(layer, module, level)) // per_unit
            kept = w.reshape(w.shape[0], -1, block).norm(dim=(0, 2)).argsort(descending=True)[:count].sort().values
            cols = (kept[:, None] * block + torch.arange(block)).reshape(-1)
            weights[(layer, module)] = (kept if module == ATTN else cols, w[:, cols])
    return weights


def test_resolves_without_loading_weights():
    info = describe_model(ModelParams(name_or_path=str(MODEL), dtype="float32"))
    assert info["kind"] == "folder" and info["parameters"] > 200_000
    assert info["structure"]["num_kv_heads"] == 4 and info["structure"]["num_heads"] == 8


def test_dense_perplexity_matches_the_published_figure(built):
    model, _, _, evals = built
    assert 3.5 < perplexity(model, evals, 16) < 4.8  # ~4.1 on dev.txt in 256-token windows


def test_obs_beats_magnitude_pruning_at_the_same_structure(built):
    model, db, _, evals = built
    levels = uniform_levels(0.5, db.levels, db.structure.num_layers)
    obs_ppl = perplexity(materialize(model, db.structure, db.weights_for(levels)), evals, 16)
    mag_ppl = perplexity(materialize(model, db.structure, _magnitude_weights(model, db, levels)), evals, 16)
    assert obs_ppl < mag_ppl / 2


def test_short_search_improves_on_uniform(built):
    model, db, sets, _ = built
    teacher = teacher_targets(model, sets["fitness"], 8, "kl")
    start = uniform_levels(0.5, db.levels, db.structure.num_layers)
    swapper = LevelSwapper(model, db)
    swapper.apply(start)
    before = fitness(model, sets["fitness"], teacher, 8)
    p = shipped("search", generations=8, offspring=8,
                schedule=(SelectionStage(survivors=2, fitness_tokens=1024),
                          SelectionStage(survivors=1, fitness_tokens=4096)))
    state = evolve(swapper, start, p, sets["fitness"], teacher)
    after = fitness(model, sets["fitness"], teacher, 8)
    swapper.apply({m: [0] * db.structure.num_layers for m in (ATTN, MLP)})
    assert after < before and state.parent != start


def test_the_baseline_panel_on_real_weights(built, tmp_path):
    """Every baseline at the uniform model's size (1%), each one a working model; OBS's correction makes
    uniform OBS several times better one-shot than uniform magnitude, as on the paper's models."""
    from pipeline.evaluate import units_perplexity
    from pipeline.pruning.activation_stats import calibration_stats
    from pipeline.run.distributed import SINGLE
    from pipeline.search.baselines import BASELINES
    from pipeline.search.evolution import prunable_params
    from pipeline.search.panel import choose
    model, db, sets, evals = built
    stats = calibration_stats(model, sets["calib"], batch_size=16)
    uniform = uniform_levels(0.5, db.levels, db.structure.num_layers)
    target, slack = prunable_params(db, uniform), 0.01 * db.structure.dense_prunable_params
    ppl = {"uniform": perplexity(materialize(model, db.structure, db.weights_for(uniform)), evals, 16)}

    oneshot_ppl = units_perplexity(model, db.structure, sets["fitness"], 16)
    for name in BASELINES:
        choice = choose(name, db, model, stats, sets["calib"], target, slack, 16, SINGLE, oneshot_ppl)
        assert abs(choice.size(db) - target) <= slack, name
        ppl[name] = perplexity(choice.model(db, model), evals, 16)
    assert all(1 < v < 1e4 for v in ppl.values()), ppl
    assert ppl["uniform_magnitude"] > 3 * ppl["uniform"], ppl


SMOLLM2 = SHARED_DATA / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = SHARED_DATA / "wikitext2" / "valid.txt"


@pytest.mark.skipif(not SMOLLM2.is_file() or not WIKITEXT.is_file(),
                    reason="../shared/data/smollm2-135m or wikitext2 is absent")
def test_smollm2_first_layers_from_gguf(tmp_path):
    """Real weights of a modern GQA model (9 query / 3 key-value heads, head_dim 64), loaded from its GGUF
    file the ordinary transformers way and cut to its first 3 layers: level 0 reproduces the dense model and
    OBS beats magnitude pruning of the same units by a wide margin on held-out text."""
    model, tokenizer = load_dense(str(SMOLLM2))
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    model.config.layer_types = model.config.layer_types[:3] if getattr(model.config, "layer_types", None) else None
    p = shipped("data", train=str(WIKITEXT), eval=str(WIKITEXT), seq_len=128, calib_tokens=8192,
                fitness_tokens=1024, train_tokens=1024, eval_tokens=4096)
    stream = token_stream(read_documents(p.train), tokenizer)
    sets = split_train_sets(stream, p)
    calib, held_out = sets["calib"], sets["train"]  # disjoint windows of the same text
    structure = structure_of(model)
    assert (structure.num_heads, structure.num_kv_heads, structure.head_dim) == (9, 3, 64)
    build_database(model, structure, calib, levels=4, damp=0.01, out_dir=tmp_path, identity={}, batch_size=16,
                   mlp_unit=32)
    db = Database(tmp_path)
    dense = {m: [0] * 3 for m in (ATTN, MLP)}
    level0 = materialize(model, structure, db.weights_for(dense))
    with torch.no_grad():
        torch.testing.assert_close(level0(held_out[:2]).logits, model(held_out[:2]).logits, rtol=1e-4, atol=1e-4)
    teacher = teacher_targets(model, held_out, 4, "kl")
    half = {m: [2] * 3 for m in (ATTN, MLP)}
    obs = fitness(materialize(model, structure, db.weights_for(half)), held_out, teacher, 4)
    mag = fitness(materialize(model, structure, _magnitude_weights(model, db, half, mlp_block=32)), held_out, teacher, 4)
    assert obs < mag / 2, (obs, mag)
