"""Every family goes database -> search -> materialise -> export -> reload. Exported folders load
where this project cannot be imported: a subprocess (isolated mode, cwd outside the repo, the project's
packages refused) loads each family's folder with
trust_remote_code, reproduces the pipeline's logits, generates the same greedy tokens with and
without the KV cache, and round-trips save_pretrained."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import shipped, tiny_family

from pipeline.config import SelectionStage
from pipeline.model.demo import train_tokenizer
from pipeline.model.export import save_pruned
from pipeline.model.materialize import materialize
from pipeline.model.structure import ATTN, MLP, structure_of
from pipeline.pruning.database import Database, build_database
from pipeline.search.evolution import LevelSwapper, evolve
from pipeline.search.fitness import teacher_targets

FAMILIES = ["llama", "llama_mha", "mistral", "qwen2", "qwen3"]

CLEAN_LOAD = textwrap.dedent('''
    import importlib.abc, json, sys
    class Refuse(importlib.abc.MetaPathFinder):  # this project cannot be imported here
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"pipeline", "stages"}:
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Refuse())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, tokens_file, out_file = sys.argv[1:4]
    tokens = torch.load(tokens_file)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    logits = model(tokens).logits
    with_cache = model.generate(tokens[:1, :5], max_new_tokens=12, do_sample=False, use_cache=True)
    without = model.generate(tokens[:1, :5], max_new_tokens=12, do_sample=False, use_cache=False)
    model.save_pretrained(folder + "_resaved")
    again = AutoModelForCausalLM.from_pretrained(folder + "_resaved", trust_remote_code=True).eval()
    torch.save({"logits": logits, "with_cache": with_cache, "without": without,
                "resaved": again(tokens).logits, "tokenizer": len(tokenizer),
                "class": type(model).__name__, "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"pipeline", "stages", "mlflow", "dvc"})},
               out_file)
''')


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 300)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_folder_loads_without_this_project(family, tokenizer, tokens, tmp_path):
    model = tiny_family(family)
    structure = structure_of(model)
    build_database(model, structure, tokens, 4, 0.01, tmp_path / "db", {}, batch_size=6)
    db = Database(tmp_path / "db")
    fitness_set = tokens[:4]
    state = evolve(LevelSwapper(copy.deepcopy(model), db), {ATTN: [2, 2], MLP: [2, 2]},
                   shipped("search", generations=3, offspring=4,
                           schedule=(SelectionStage(survivors=1, fitness_tokens=64),)), fitness_set,
                   teacher_targets(model, fitness_set, 4, "kl"))
    assert sum(state.parent[ATTN]) == 4 and sum(state.parent[MLP]) == 4
    pruned = materialize(model, structure, db.weights_for({ATTN: [1, 4], MLP: [3, 0]}))  # layer 1: no heads
    folder = tmp_path / "pruned"
    save_pruned(pruned, tokenizer, folder, "# card\n")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "pruned_llama.PrunedLlamaForCausalLM"
    assert [len(r["q_heads"]) for r in config["layers"]] == [3, 0] and config["layers"][1]["mlp"] == 24
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", CLEAN_LOAD, str(folder), str(tmp_path / "tokens.pt"),
                    str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "PrunedLlamaForCausalLM" and out["loaded"] == []
    torch.testing.assert_close(out["logits"], pruned(tokens).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["with_cache"], out["without"])
    torch.testing.assert_close(out["resaved"], out["logits"])
    assert out["tokenizer"] == len(tokenizer)


def test_folder_with_the_old_per_layer_lists_loads(tokenizer, tokens, tmp_path):
    """Folders exported before the per-layer records: three parallel lists in config.json and
    zero-width weights for removed modules."""
    from pipeline.model.export import load_pruned
    from pipeline.model.pruned_llama import PrunedLlamaConfig
    model = tiny_family("qwen3")
    structure = structure_of(model)
    build_database(model, structure, tokens, 4, 0.01, tmp_path / "db", {}, batch_size=6)
    pruned = materialize(model, structure, Database(tmp_path / "db").weights_for({ATTN: [1, 4], MLP: [4, 2]}))
    save_pruned(pruned, tokenizer, tmp_path / "pruned", "# card\n")
    config_file = tmp_path / "pruned" / "config.json"
    config = json.loads(config_file.read_text())
    layers = config.pop("layers")
    config.update(layer_q_heads=[r["q_heads"] for r in layers], layer_kv_heads=[r["kv_heads"] for r in layers],
                  layer_intermediate_sizes=[r["mlp"] for r in layers])
    config_file.write_text(json.dumps(config))
    old = PrunedLlamaConfig.from_pretrained(tmp_path / "pruned")
    assert old.layers == layers and not hasattr(old, "layer_q_heads")
    assert "layer_q_heads" not in old.to_json_string()
    loaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, pruned(tokens).logits)
