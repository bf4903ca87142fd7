import math

import pytest
import torch

from megatron_t2i.training.lr import build_scheduler, lr_factor


def test_warmup_then_cosine_to_floor():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine", 0.1) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))                      # rising
    assert all(a >= b for a, b in zip(f[10:total], f[11:total]))              # falling
    mid = 10 + 45
    assert f[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[total] == pytest.approx(0.1) and f[total + 4] == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr decay style"):
        lr_factor(0, 10, 1, "exp")


def test_scheduler_resumes_from_its_state():
    def run(steps, state=None):  # records the lr each optimiser step actually used
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = build_scheduler(opt, 50, 0.1, "cosine", 0.1)
        if state:  # as a checkpoint restores both
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs, (opt.state_dict(), sched.state_dict())

    full, _ = run(30)
    first, state = run(12)
    rest, _ = run(18, state)
    assert first + rest == pytest.approx(full)
