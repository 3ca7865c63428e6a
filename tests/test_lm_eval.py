"""lm-evaluation-harness evaluates an exported pruned folder on a local multiple-choice task; its
accuracy equals an independent computation of each choice's log-likelihood with the model."""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_family

from pipeline.evaluate import run_lm_eval
from pipeline.model.demo import train_tokenizer
from pipeline.model.export import load_pruned, save_pruned
from pipeline.model.materialize import materialize
from pipeline.model.structure import structure_of
from pipeline.pruning.database import Database, build_database

pytest.importorskip("lm_eval")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house"]


def _task(folder, rows):
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'data.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


@torch.no_grad()
def _loglikelihood(model, tokenizer, context, continuation):
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(logprobs[len(ctx) - 1:].gather(-1, torch.tensor(cont)[:, None]).sum())


def test_lm_eval_on_an_exported_folder_matches_direct_loglikelihoods(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = train_tokenizer([" ".join(WORDS)] * 40, 300)
    model = tiny_family("llama", vocab=len(tokenizer))
    structure = structure_of(model)
    tokens = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    build_database(model, structure, tokens, 4, 0.01, tmp_path / "db", {}, batch_size=4)
    pruned = materialize(model, structure, Database(tmp_path / "db").weights_for({"attn": [1, 2], "mlp": [2, 1]}))
    save_pruned(pruned, tokenizer, tmp_path / "model", "# card\n")
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(12):
        pick = torch.randperm(len(WORDS), generator=gen)[:6].tolist()
        rows.append({"question": " ".join(WORDS[j] for j in pick[:3]), "choices": [WORDS[j] for j in pick[3:]],
                     "answer": i % 3})
    (tmp_path / "tasks").mkdir()
    _task(tmp_path / "tasks", rows)
    results = run_lm_eval(tmp_path / "model", ["tiny_mc"], tmp_path / "tasks", batch_size=4)
    loaded = load_pruned(tmp_path / "model")
    correct = [max(range(3), key=lambda c: _loglikelihood(loaded, tokenizer, r["question"], " " + r["choices"][c]))
               == r["answer"] for r in rows]
    assert results["tiny_mc"]["acc"] == pytest.approx(sum(correct) / len(rows))


def test_unknown_task_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_task"):
        run_lm_eval(tmp_path, ["no_such_task"], None)


def test_items_longer_than_the_context_are_truncated_and_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = train_tokenizer([" ".join(WORDS)] * 40, 300)
    model = tiny_family("llama", vocab=len(tokenizer))  # context: 64 positions
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    long = " ".join(WORDS * 8)  # about 100 tokens: longer than the whole context
    rows = [{"question": "the cat", "choices": ["sat", "ran", "red"], "answer": 0},
            {"question": long, "choices": ["sat", "ran", "red"], "answer": 1},  # context cut from the left
            {"question": "a dog", "choices": [long, "ran", "red"], "answer": 1}]  # a choice longer than the context
    (tmp_path / "tasks").mkdir()
    _task(tmp_path / "tasks", rows)
    results = run_lm_eval(tmp_path / "model", ["tiny_mc"], tmp_path / "tasks", batch_size=2)
    assert results["tiny_mc"]["truncated"] == 4  # 3 choices of the long question + the long choice
    assert 0 <= results["tiny_mc"]["acc"] <= 1 and "acc_stderr" in results["tiny_mc"]
