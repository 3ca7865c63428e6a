"""Fitness functions against direct computations."""
import math

import torch
import torch.nn.functional as F

from pipeline.search.fitness import Teacher, fitness, teacher_targets, topk_kl_per_token


def _logits(seed, shape=(3, 5, 40), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_topk_kl_grows_to_the_full_kl_and_equals_it_at_full_vocabulary():
    teacher_lp = F.log_softmax(_logits(0), -1)
    student = _logits(1)
    full = (teacher_lp.exp() * (teacher_lp - F.log_softmax(student, -1))).sum(-1)
    previous = torch.zeros_like(full)
    for k in (1, 2, 5, 10, 20, 39, 40):
        values, index = teacher_lp.topk(k, -1)
        approx = topk_kl_per_token(values, index.int(), student)
        assert (approx <= full + 1e-5).all() and (approx >= previous - 1e-5).all()  # coarse-graining: monotone
        previous = approx
    torch.testing.assert_close(previous, full, rtol=1e-5, atol=1e-5)


def test_topk_kl_of_identical_distributions_is_zero():
    logits = _logits(2)
    values, index = F.log_softmax(logits, -1).topk(4, -1)
    assert topk_kl_per_token(values, index.int(), logits).abs().max() < 1e-5


class _Fixed(torch.nn.Module):
    """A 'model' returning fixed logits, so fitness can be checked by hand."""
    def __init__(self, logits):
        super().__init__()
        self.out = logits

    def forward(self, input_ids, use_cache=None):
        return type("Out", (), {"logits": self.out[: len(input_ids)]})()


def test_fitness_kinds_against_direct_formulas():
    tokens = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(3))
    dense, cand = _Fixed(_logits(4)), _Fixed(_logits(5))
    full = teacher_targets(dense, tokens, 3, "kl")
    direct_kl = (full.logprobs.exp() * (full.logprobs - F.log_softmax(cand.out, -1))).sum(-1).mean()
    assert math.isclose(fitness(cand, tokens, full, 3), float(direct_kl), rel_tol=1e-5)
    ce = F.cross_entropy(cand.out[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    assert math.isclose(fitness(cand, tokens, Teacher("ppl"), 3), math.exp(float(ce)), rel_tol=1e-5)
    top = teacher_targets(dense, tokens, 3, "topk_kl", topk=40)
    assert math.isclose(fitness(cand, tokens, top, 3), float(direct_kl), rel_tol=1e-4)
    assert top.logprobs.shape == (3, 5, 40) and top.index.dtype == torch.int32
