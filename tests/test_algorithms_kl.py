"""KL estimators and beta controllers against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.controllers import AdaptiveKLController, FixedKLController
from chatrl.algorithms.kl import KL_ESTIMATORS, kl_loss, kl_penalty

LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -2.0, -0.25], [-1.0, -1.0, -2.0]])
# d = logp - ref = [[0.5, 0, -0.25], [-2, 0, 1]]


def test_estimators_by_hand():
    assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[0.5, 0.0, -0.25], [-2.0, 0.0, 1.0]]))
    # 0.5 d^2: 0.5*0.25, 0, 0.5*0.0625 | 0.5*4, 0, 0.5*1
    assert_close(kl_penalty(LOGP, REF, "k2"), torch.tensor([[0.125, 0.0, 0.03125], [2.0, 0.0, 0.5]]))
    assert_close(kl_penalty(LOGP, REF, "abs"), torch.tensor([[0.5, 0.0, 0.25], [2.0, 0.0, 1.0]]))
    # k3 = e^x - x - 1, x = -d = [[-0.5, 0, 0.25], [2, 0, -1]]
    # e^-0.5 = 0.60653066 -> 0.10653066;  e^0.25 = 1.28402542 -> 0.03402542
    # e^2 = 7.3890561 -> 4.3890561;       e^-1 = 0.36787944 -> 0.36787944
    expected_k3 = torch.tensor([[0.10653066, 0.0, 0.03402542], [4.3890561, 0.0, 0.36787944]])
    assert_close(kl_penalty(LOGP, REF, "k3"), expected_k3)


def test_k3_nonnegative_and_zero_when_equal():
    a, b = torch.randn(64, 16) * 3, torch.randn(64, 16) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert torch.equal(kl_penalty(a, a, "k3"), torch.zeros_like(a))
    assert torch.isfinite(kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")).all()  # clamped


def test_k1_and_k3_are_unbiased_for_kl():
    # Exact expectation over a ~ p of two categorical distributions equals KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    true_kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        expectation = (p * kl_penalty(p.log(), q.log(), kind)).sum()
        assert_close(expectation, true_kl)


def test_kl_loss_is_masked_mean():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # k2 on counted tokens: 0.125 + 0 + 2 = 2.125 over 3 tokens
    assert_close(kl_loss(LOGP, REF, mask, "k2"), torch.tensor(2.125 / 3))
    noisy = torch.where(mask.bool(), LOGP, torch.full_like(LOGP, 77.0))
    assert torch.equal(kl_loss(noisy, REF, mask), kl_loss(LOGP, REF, mask))


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match="abs, k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs"}


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05


def test_adaptive_controller_two_updates_by_hand():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # kl 6.6: e = 6.6/6 - 1 = 0.1 (inside +-0.2); beta = 0.1 * (1 + 0.1 * 256/10000) = 0.1 * 1.00256
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(0.100256)
    # kl 3: e = 3/6 - 1 = -0.5 -> clipped to -0.2; beta = 0.100256 * (1 - 0.2 * 256/10000)
    #       = 0.100256 * 0.99488 = 0.100256 - 0.00051331072 = 0.09974268928
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.09974268928)
    # kl 60: e = 9 -> clipped to +0.2; beta *= 1.00512
    ctl.update(60.0, 256)
    assert ctl.value == pytest.approx(0.09974268928 * 1.00512)


def test_controller_state_roundtrip():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 1000)  # e = 0.2 -> beta = 0.1 * 1.02
    other = AdaptiveKLController(0.1, 6.0, 10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == pytest.approx(0.102)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 10000)
