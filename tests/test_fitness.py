"""Fitness functions against direct computations."""
import math

import torch
import torch.nn.functional as F

from pipeline.search.fitness import Teacher, fitness, kl_from_probs, teacher_targets, topk_kl_per_token


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
    teacher_lp, student_lp = F.log_softmax(dense.out.double(), -1), F.log_softmax(cand.out.double(), -1)
    direct_kl = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1).mean()  # in float64, from the definition
    # fp32 terms of magnitude ~10 carry ~1e-6 of round-off; the mean KL here is ~3
    assert math.isclose(fitness(cand, tokens, full, 3), float(direct_kl), rel_tol=1e-5)
    ce = F.cross_entropy(cand.out[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    assert math.isclose(fitness(cand, tokens, Teacher("ppl"), 3), math.exp(float(ce)), rel_tol=1e-5)
    top = teacher_targets(dense, tokens, 3, "topk_kl", topk=40)
    assert math.isclose(fitness(cand, tokens, top, 3), float(direct_kl), rel_tol=1e-4)
    assert top.values.shape == (3, 5, 40) and top.index.dtype == torch.int32


def test_kl_from_probabilities_matches_the_definition_for_large_logits():
    # Llama-like magnitudes: logits around 30 with a spread of 5 over a 2048 vocabulary, the worst case for
    # p.z - logsumexp(z), two terms of ~30 whose difference is the cross-entropy
    teacher, student = (30 + _logits(seed, (2, 16, 2048), 5.0) for seed in (6, 7))
    teacher_lp = F.log_softmax(teacher, -1)
    fast = kl_from_probs(teacher_lp.exp(), torch.linalg.vecdot(teacher_lp.exp(), teacher_lp), student)
    t64, s64 = F.log_softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)
    direct = (t64.exp() * (t64 - s64)).sum(-1)
    # fp32 round-off of terms of ~30 is ~2e-6 each, summed over the vocabulary: well under 1e-4 per token
    torch.testing.assert_close(fast.double(), direct, rtol=0, atol=1e-4)
    assert abs(float(fast.mean()) - float(direct.mean())) < 1e-5 * float(direct.mean())
