"""The DPO family against hand-computed numbers (formulas in chatrl/algorithms/preference.py)."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from chatrl.algorithms.preference import PREFERENCE_LOSSES, REFERENCE_FREE, PairLogps
from chatrl.config_offline import DPOOptions


def _pair(**over: float) -> PairLogps:
    # one pair: log pi(chosen) = -10 over 5 tokens, log pi(rejected) = -12 over 4 tokens, reference -11 for both
    v = {"chosen": -10.0, "rejected": -12.0, "chosen_len": 5.0, "rejected_len": 4.0, "ref_chosen": -11.0,
         "ref_rejected": -11.0, **over}
    return PairLogps(**{k: torch.tensor([x]) for k, x in v.items()})


def _softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_dpo_sigmoid_and_cdpo_by_hand() -> None:
    # log-ratios: chosen -10 - (-11) = +1, rejected -12 - (-11) = -1; margin h = 2; beta 0.5 -> z = 1
    loss, stats = PREFERENCE_LOSSES["sigmoid"](_pair(), beta=0.5)
    assert loss.item() == pytest.approx(_softplus(-1.0), abs=1e-6)  # -log sigmoid(1) = 0.313262
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5) and stats["rewards/rejected"].item() == pytest.approx(-0.5)
    assert stats["rewards/accuracy"].item() == 1.0 and stats["rewards/margin"].item() == pytest.approx(1.0)
    # cDPO, e = 0.1: 0.9 * (-log sigmoid(1)) + 0.1 * (-log sigmoid(-1)) = 0.9 * 0.313262 + 0.1 * 1.313262
    loss, _ = PREFERENCE_LOSSES["sigmoid"](_pair(), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.4132617, abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    lp = _pair()
    lp.chosen.requires_grad_(True)
    lp.rejected.requires_grad_(True)
    loss, _ = PREFERENCE_LOSSES["sigmoid"](lp, beta=0.5)
    loss.backward()
    # dL/dchosen = -beta * sigmoid(-z) = -0.5 * 0.268941; dL/drejected = +0.5 * 0.268941
    assert lp.chosen.grad.item() == pytest.approx(-0.1344707, abs=1e-6)
    assert lp.rejected.grad.item() == pytest.approx(0.1344707, abs=1e-6)


def test_ipo_by_hand() -> None:
    # (h - 1 / (2 beta))^2 = (2 - 1)^2 with beta 0.5; with beta 0.25: (2 - 2)^2 = 0
    assert PREFERENCE_LOSSES["ipo"](_pair(), beta=0.5)[0].item() == pytest.approx(1.0)
    assert PREFERENCE_LOSSES["ipo"](_pair(), beta=0.25)[0].item() == pytest.approx(0.0, abs=1e-7)


def test_simpo_by_hand_ignores_the_reference() -> None:
    # averages: chosen -10/5 = -2, rejected -12/4 = -3; beta 2, gamma 0.5: z = 2(-2) - 2(-3) - 0.5 = 1.5
    loss, stats = PREFERENCE_LOSSES["simpo"](_pair(ref_chosen=99.0), beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(_softplus(-1.5), abs=1e-6)  # 0.201413
    assert stats["rewards/chosen"].item() == pytest.approx(-4.0) and stats["rewards/rejected"].item() == pytest.approx(-6.0)


def test_orpo_by_hand() -> None:
    # a_c = -2: odds = e^-2 / (1 - e^-2) = 0.135335 / 0.864665 -> log odds -1.854587
    # a_r = -3: odds = e^-3 / (1 - e^-3) = 0.049787 / 0.950213 -> log odds -2.948931
    # L = NLL 2 + 0.1 * -log sigmoid(1.094344) = 2 + 0.1 * 0.288744
    loss, stats = PREFERENCE_LOSSES["orpo"](_pair(), beta=0.1)
    assert loss.item() == pytest.approx(2.0288744, abs=1e-5)
    assert stats["nll_chosen"].item() == pytest.approx(2.0)


def test_reference_losses_need_the_reference() -> None:
    lp = _pair()
    lp.ref_chosen = lp.ref_rejected = None
    for name in set(PREFERENCE_LOSSES) - REFERENCE_FREE:
        with pytest.raises(ValueError, match="reference"):
            PREFERENCE_LOSSES[name](lp, beta=0.1)
    for name in REFERENCE_FREE:
        assert torch.isfinite(PREFERENCE_LOSSES[name](lp, beta=0.1)[0])


def test_config_choices_are_the_registered_losses() -> None:
    choices = typing.get_args(typing.get_type_hints(DPOOptions)["loss"])
    assert set(choices) == set(PREFERENCE_LOSSES)
