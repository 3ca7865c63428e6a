"""Sheared-LLaMA's learned pruning (pipeline/pruning/sheared.py) on a tiny GQA Llama: the closed-form expected
size against the mean size of sampled masks, the Lagrangian driving the expected size to the target, the
final masks within the tolerance, and the physically pruned model equal to the masked model."""
import copy

import pytest
import torch
from helpers import tiny_llama

from pipeline.model.materialize import materialize
from pipeline.model.structure import structure_of
from pipeline.pruning.sheared import (
    MaskedModel,
    ShearedMasks,
    fit_to_size,
    keep_probability,
    kept_and_weights,
    sample_mask,
    shear,
    size_under,
)


@pytest.fixture(scope="module")
def sheared():
    model = tiny_llama(layers=3, heads=4, kv_heads=2, hidden=32, intermediate=48)
    s = structure_of(model)
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
    masks = ShearedMasks(s)
    target = s.dense_prunable_params // 2
    trained = copy.deepcopy(model)
    result = shear(trained, masks, tokens, target, steps=300, batch_size=8, lr=1e-3, mask_lr=1.0, warmup_steps=50)
    return s, tokens, masks, target, trained, result


def test_keep_probability_is_the_share_of_nonzero_samples():
    log_alpha = torch.linspace(-3, 3, 7)
    samples = torch.stack([sample_mask(log_alpha, torch.Generator().manual_seed(i)) for i in range(4000)])
    torch.testing.assert_close((samples > 0).double().mean(0), keep_probability(log_alpha).double(), atol=0.03, rtol=0)


def test_expected_size_is_the_mean_size_of_sampled_masks():
    """Closed form (query heads, key/value heads kept while any of their query heads is, neurons, sublayers)
    against the exact size of 4,000 sampled mask sets."""
    s = structure_of(tiny_llama(layers=3, heads=4, kv_heads=2, hidden=32, intermediate=48))
    masks = ShearedMasks(s)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.normal_(0, 2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    sampled = sum(size_under(s, masks.sample(g)) for _ in range(4000)) / 4000
    assert float(masks.expected_params().detach()) == pytest.approx(sampled, rel=0.01)


def test_the_lagrangian_drives_the_expected_size_to_the_target(sheared):
    s, _, masks, target, _, result = sheared
    assert result.target_removed[-1] == pytest.approx(0.5) and result.target_removed[0] == 0
    assert result.expected_removed[0] < 0.05 and abs(result.expected_removed[-1] - 0.5) < 0.03
    assert result.tokens == 300 * 8 * 16
    slack = 0.01 * s.dense_prunable_params
    z, _ = fit_to_size(s, result.masks, masks.log_alpha, target, slack)
    assert abs(size_under(s, z) - target) <= slack


def test_the_pruned_model_equals_the_masked_model_with_the_final_masks(sheared):
    s, tokens, masks, target, trained, result = sheared
    z, _ = fit_to_size(s, result.masks, masks.log_alpha, target, 0.01 * s.dense_prunable_params)
    assert any(0 < float(v) < 1 for v in z["head"].flatten())  # soft values are folded into the weights
    kept, weights = kept_and_weights(trained, s, z)
    pruned = materialize(trained, s, weights)
    masked = MaskedModel(trained, s)
    masked.set(z)
    try:
        with torch.no_grad():
            reference = trained(tokens).logits
    finally:
        masked.remove()
    torch.testing.assert_close(pruned(tokens).logits, reference, rtol=1e-4, atol=1e-4)
    assert sum(len(v) for v in kept.values()) < s.num_layers * (s.num_heads + s.intermediate_size)


def test_recovery_budgets_come_in_pairs_five_times_apart():
    from pipeline.evaluate import recovery_budgets
    assert recovery_budgets(250, 5) == [0, 10, 23, 50, 112, 250]
    for steps, points in ((200, 5), (40, 3), (500, 7)):
        budgets = recovery_budgets(steps, points)
        evens = budgets[1::2]
        assert budgets[0] == 0 and len(budgets) == points + 1
        assert all(b == 5 * a for a, b in zip(evens, evens[1:]))


def test_the_recovery_stage_trains_every_method_alike_and_counts_tokens_exactly(tmp_path, monkeypatch):
    """stages/recovery.py on a tiny model's outputs laid out as the earlier stages leave them (no DVC, no MLflow)."""
    import json

    from helpers import shipped, stage_workspace

    from pipeline.run.distributed import SINGLE
    from pipeline.search.evolution import prunable_params, uniform_at_size
    from stages import recovery as stage
    monkeypatch.chdir(tmp_path)
    db = stage_workspace(tmp_path, tiny_llama(layers=3, heads=4, kv_heads=2, hidden=32, intermediate=48),
                         train_rows=16)
    uniform = uniform_at_size(db, 0.5, 0.01)
    searched = uniform  # the size is what matters here
    (tmp_path / "levels").mkdir()
    (tmp_path / "levels/searched.json").write_text(json.dumps(searched))
    (tmp_path / "levels/uniform.json").write_text(json.dumps(uniform))
    params = shipped()
    params = params.model_copy(update={
        "search": params.search.model_copy(update={"budget_tolerance": 0.01}),
        "finetune": params.finetune.model_copy(update={"batch_size": 2}),
        "sheared": params.sheared.model_copy(update={"steps": 40, "batch_size": 4, "warmup_steps": 10}),
        "recovery": params.recovery.model_copy(update={"enabled": True, "steps": 10, "points": 3, "baseline": "wanda_sp"}),
        "evaluate": params.evaluate.model_copy(update={"batch_size": 4})})
    metrics = stage.main(params, lambda message: None, SINGLE)
    target = prunable_params(db, searched)
    assert metrics["target_params"] == target and all(metrics["within_tolerance"].values())
    budgets = [0, 2, 5, 10]  # m = round(10 / 5) = 2: 2, ceil(2 * sqrt 5) = 5, 10
    for curve in metrics["curves"].values():
        assert [int(t) for t in curve] == [b * 2 * 16 for b in budgets]  # steps x batch x sequence length
        assert all(1 < v < 1e4 for v in curve.values())
    assert metrics["sheared"]["tokens"] == 40 * 4 * 16
    assert [row["tokens"] for row in metrics["headline"]] == [2 * 2 * 16]
    rows = (tmp_path / "plots/recovery.csv").read_text().splitlines()
    assert rows[0] == "tokens,searched,uniform,sheared,baseline" and len(rows) == 1 + len(budgets)
    # trained alike: every method's perplexity falls from one-shot to the largest budget
    assert all(c[str(budgets[-1] * 32)] < c["0"] for c in metrics["curves"].values())
