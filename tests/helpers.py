"""What tests share: tiny models of every family, the shipped params, an independent masked reference
for pruned models, a small tokenizer. Imported as `from helpers import ...` (pytest puts tests/ on the path)."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shipped(section=None, **changes):
    """The shipped params.yaml (the one source of param values), or one of its sections, with `changes`
    applied and validated."""
    from pipeline.config import load_params
    params = load_params(ROOT / "params.yaml")
    part = params if section is None else getattr(params, section)
    return type(part).model_validate({**part.model_dump(), **changes})


def tiny_llama(seed=0, layers=3, heads=4, kv_heads=2, hidden=32, intermediate=24, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # spread the weights so pruning changes logits visibly
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    return model


def tiny_family(family: str, seed=0, layers=2, heads=4, kv_heads=2, hidden=32, intermediate=24, vocab=64):
    """Randomly initialised tiny models of each supported family, with biases and norms made non-trivial."""
    import transformers
    configs = {"llama": transformers.LlamaConfig, "llama_mha": transformers.LlamaConfig,
               "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}
    models = {"llama": transformers.LlamaForCausalLM, "llama_mha": transformers.LlamaForCausalLM,
              "mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
              "qwen3": transformers.Qwen3ForCausalLM}
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=heads if family == "llama_mha" else kv_heads,
              max_position_embeddings=64, tie_word_embeddings=False)
    if family == "qwen3":
        kw["head_dim"] = 12  # Qwen3 decouples head_dim from hidden/heads
    torch.manual_seed(seed)
    model = models[family](configs[family](**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            else:  # biases and norm weights away from their trivial init
                p.add_(0.3 * torch.randn_like(p))
    return model


def masked_copy(model, db, levels):
    """Independent reference for a pruned model: a deep copy of the dense model whose o_proj /
    down_proj keep only the database's corrected columns of the kept heads / neurons, zeros elsewhere."""
    import copy
    masked = copy.deepcopy(model)
    head_dim = db.structure.head_dim
    with torch.no_grad():
        for module, size in (("attn", head_dim), ("mlp", 1)):
            for layer, level in enumerate(levels[module]):
                kept, weight = db.level_weight(layer, module, level)
                block = masked.model.layers[layer]
                proj = block.self_attn.o_proj if module == "attn" else block.mlp.down_proj
                full = torch.zeros_like(proj.weight)
                for j, unit in enumerate(kept.tolist()):
                    full[:, unit * size:(unit + 1) * size] = weight[:, j * size:(j + 1) * size]
                proj.weight.copy_(full)
    return masked


def byte_level_tokenizer(bos="<s>", eos="</s>", vocab=300):
    """A small byte-level BPE tokenizer (any text round-trips) with the given BOS / EOS, None = none."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.model.demo import train_tokenizer
    trained = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "hello world, some text\n" * 20], vocab)
    return PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, bos_token=bos, eos_token=eos,
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def pruned_by_slicing(model, heads: list, neurons: list):
    """A physically smaller model keeping, per layer, the query heads `heads[i]` and the first
    `neurons[i]` MLP neurons of the dense `model`, output projections sliced (no OBS correction):
    the export tests need pruned shapes, not good pruned weights."""
    from pipeline.model.materialize import materialize
    from pipeline.model.structure import structure_of, unit_indices
    structure = structure_of(model)
    level_weights = {}
    for i, block in enumerate(model.model.layers):
        kept_heads = torch.tensor(sorted(heads[i]), dtype=torch.long)
        columns = unit_indices(kept_heads, structure.head_dim)
        level_weights[(i, "attn")] = (kept_heads, block.self_attn.o_proj.weight[:, columns])
        kept_neurons = torch.arange(neurons[i])
        level_weights[(i, "mlp")] = (kept_neurons, block.mlp.down_proj.weight[:, kept_neurons])
    return materialize(model, structure, level_weights)


def scored_databases(model, tokens, levels, tmp_path_factory, batch_size):
    """The calibration statistics of `tokens` and the magnitude, wanda_sp and flap databases of `model`."""
    from pipeline.model.structure import structure_of
    from pipeline.pruning.activation_stats import calibration_stats
    from pipeline.pruning.database import Database
    from pipeline.pruning.scored import build_scored_database
    stats = calibration_stats(model, tokens, batch_size=batch_size)
    dbs = {}
    for method in ("magnitude", "wanda_sp", "flap"):
        out = tmp_path_factory.mktemp(method)
        build_scored_database(model, structure_of(model), method, stats, levels, out, {})
        dbs[method] = Database(out)
    return stats, dbs


def stage_workspace(root, model, train_rows=8, levels=8):
    """What the stages before baselines / recovery leave in `root` for `model`: base/model with a tokenizer,
    the four token sets (16-token windows) and an OBS database. Returns the Database."""
    from pipeline.model.structure import structure_of
    from pipeline.pruning.database import Database, build_database
    root = Path(root)
    model.save_pretrained(root / "base/model")
    byte_level_tokenizer().save_pretrained(root / "base/model")
    g = torch.Generator().manual_seed(3)
    (root / "data/tokens").mkdir(parents=True)
    for name, rows in (("calib", 8), ("fitness", 4), ("train", train_rows), ("eval", 4)):
        torch.save(torch.randint(0, 64, (rows, 16), generator=g), root / f"data/tokens/{name}.pt")
    build_database(model, structure_of(model), torch.load(root / "data/tokens/calib.pt"), levels, 0.01,
                   root / "database", {}, batch_size=4)
    return Database(root / "database")
