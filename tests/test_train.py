"""Training: an interrupted run resumed from its checkpoint equals an uninterrupted one."""
import pytest
import torch
from helpers import tiny_llama

from pipeline.train import train_causal_lm


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
