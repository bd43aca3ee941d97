"""Learning-rate schedules: shapes at named steps (multipliers of the base lr)."""

from __future__ import annotations

import pytest
import torch

from sam3_lora.schedules import build_scheduler


def _multipliers(schedule: str, total: int = 100, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, schedule, total_steps=total, **kwargs)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_warms_up_then_decays_to_the_floor():
    lrs = _multipliers("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and lrs[55] == pytest.approx(0.55, abs=0.01)


def test_inverse_sqrt_is_sam3s_recipe():
    lrs = _multipliers("inverse_sqrt", warmup_steps=20, cooldown_steps=20, timescale=20)
    assert lrs[19] == pytest.approx(1.0)                      # end of warmup
    assert lrs[79] == pytest.approx((20 / 80) ** 0.5)          # lr / sqrt(step / timescale)
    assert lrs[89] == pytest.approx((20 / 90) ** 0.5 * 10 / 20)  # linear cooldown over the last 20 steps
    assert all(b <= a + 1e-9 for a, b in zip(lrs[20:], lrs[21:]))


def test_constant_after_warmup_and_unknown_name():
    assert _multipliers("constant", warmup_steps=4)[4:] == [1.0] * 96
    with pytest.raises(ValueError, match="module.schedule='linear'"):
        _multipliers("linear", warmup_steps=0)
