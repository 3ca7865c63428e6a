"""Training: an interrupted run resumed from its checkpoint equals an uninterrupted one."""
import pytest
import torch
from helpers import tiny_llama

from pipeline.train import epoch_rows, train_causal_lm


def test_resumed_training_equals_uninterrupted(tmp_path):
    data = torch.randint(0, 64, (20, 16), generator=torch.Generator().manual_seed(0))
    teacher = tiny_llama(seed=3)
    kw = dict(steps=9, batch_size=3, lr=1e-2, warmup_steps=2, seed=1, teacher=teacher, distill=0.5)
    full_model = tiny_llama()
    full = train_causal_lm(full_model, data, **kw)

    class Killed(Exception):
        pass

    def die_after_step_6(step, values):
        if step == 5:
            raise Killed
    model = tiny_llama()
    with pytest.raises(Killed):
        train_causal_lm(model, data, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=2, on_step=die_after_step_6,
                        **kw)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 6
    resumed_model = tiny_llama()  # a fresh process starts from the untrained weights again
    resumed = train_causal_lm(resumed_model, data, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=2, **kw)
    assert resumed == full
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_batches_walk_shuffled_epochs_without_replacement():
    n, batch = 10, 3
    rows = torch.cat([epoch_rows(step, batch, n, seed=4) for step in range(10)])  # 30 rows = 3 epochs
    for epoch in range(3):
        assert sorted(rows[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert rows[:n].tolist() != rows[n:2 * n].tolist()  # each epoch in a new order
    assert torch.equal(epoch_rows(7, batch, n, seed=4), rows[21:24])  # a pure function: resuming draws the same


def _small_weights_model():
    """Weights of a typical trained scale, N(0, 0.02): a step of lr 1e-5 is below half a bf16 ulp of most."""
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return model


def test_bf16_training_moves_weights_as_fp32_training_does():
    data = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(steps=60, batch_size=2, lr=1e-5, seed=1, constant_lr=True)
    reference, low = _small_weights_model(), _small_weights_model()
    for p in low.parameters():
        p.data = p.data.bfloat16()
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    train_causal_lm(reference, data, **kw)
    train_causal_lm(low, data, **kw)
    assert next(low.parameters()).dtype == torch.bfloat16 and low.model.rotary_emb.inv_freq.dtype == torch.float32
    moved_fp32 = moved_bf16 = off = total = 0
    for (name, trained), after in zip(reference.named_parameters(), low.parameters()):
        if trained.dim() != 2:
            continue
        moved_fp32 += (trained - start[name]).abs().sum().item()
        moved_bf16 += (after.float() - start[name].bfloat16().float()).abs().sum().item()
        # One bf16 ulp of the fp32 result: what rounding alone allows (8 significant bits).
        ulp = torch.finfo(torch.bfloat16).eps * trained.abs().clamp_min(1e-6)
        off += ((after.float() - trained.bfloat16().float()).abs() > ulp).sum().item()
        total += trained.numel()
    # Stepping bf16 weights directly moves them about 16% as far (most steps round away) and leaves
    # most of them where they were; with fp32 master weights the update is fp32's, rounded once.
    assert 0.9 < moved_bf16 / moved_fp32 < 1.1
    assert off / total < 0.02
