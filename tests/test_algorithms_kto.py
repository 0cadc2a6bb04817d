"""KTO (algorithms/preference.py `kto_loss`) against numbers worked out by hand with `math`, and its config."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from chatrl.algorithms.preference import UNPAIRED_LOSSES, UnpairedLogps
from chatrl.config_offline import KTOConfig, KTOOptions
from chatrl.configbase import help_lines, load_config
from chatrl.errors import ChatrlError

kto = UNPAIRED_LOSSES["kto"]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _batch(kl_diffs: tuple[float, float, float] = (0.5, 0.2, 0.2)) -> UnpairedLogps:
    # three examples: desirable, undesirable, desirable with log-ratios r = +1, -1, +1;
    # their KL rows' policy - reference log-probs are `kl_diffs` (mean 0.3 by default)
    kl = torch.tensor([-20.0, -21.0, -19.0])
    return UnpairedLogps(logps=torch.tensor([-10.0, -12.0, -8.0]), ref_logps=torch.tensor([-11.0, -11.0, -9.0]),
                         kl_logps=kl, ref_kl_logps=kl - torch.tensor(kl_diffs),
                         desirable=torch.tensor([True, False, True]))


def test_kto_loss_by_hand() -> None:
    # z0 = mean(0.5, 0.2, 0.2) = 0.3; beta 0.5
    # desirable, r = 1:    1 - sigmoid(0.5 (1 - 0.3)) = 1 - sigmoid(0.35) = 0.413382
    # undesirable, r = -1: 1 - sigmoid(0.5 (0.3 + 1)) = 1 - sigmoid(0.65) = 0.342990
    loss, stats = kto(_batch(), beta=0.5)
    want = (2 * (1 - _sigmoid(0.35)) + (1 - _sigmoid(0.65))) / 3  # mean over the three examples
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(0.389918, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(0.3, abs=1e-6)
    assert stats["rewards/desirable"].item() == pytest.approx(0.5)  # beta * r over the desirable examples
    assert stats["rewards/undesirable"].item() == pytest.approx(-0.5)
    assert stats["logps/desirable"].item() == pytest.approx(-9.0)  # mean of -10 and -8


def test_weights_scale_their_own_class() -> None:
    d, u = 1 - _sigmoid(0.35), 1 - _sigmoid(0.65)
    assert kto(_batch(), beta=0.5, desirable_weight=2.0)[0].item() == pytest.approx((2 * 2 * d + u) / 3, abs=1e-6)
    assert kto(_batch(), beta=0.5, undesirable_weight=3.0)[0].item() == pytest.approx((2 * d + 3 * u) / 3, abs=1e-6)


def test_reference_point_comes_from_the_mismatched_rows_only() -> None:
    # the examples' own log-ratios (+1, -1, +1: mean 1/3) do not move z0; the KL rows do
    assert kto(_batch((0.9, 0.9, 0.9)), beta=0.5)[1]["kl"].item() == pytest.approx(0.9, abs=1e-6)
    moved = _batch()
    moved.logps = moved.logps + 5.0
    assert kto(moved, beta=0.5)[1]["kl"].item() == pytest.approx(0.3, abs=1e-6)


def test_reference_point_is_clamped_at_zero() -> None:
    # KL rows the policy scores below the reference (mean -0.4): z0 = max(0, -0.4) = 0
    loss, stats = kto(_batch((-0.5, -0.5, -0.2)), beta=0.5)
    assert stats["kl"].item() == 0.0
    want = (2 * (1 - _sigmoid(0.5)) + (1 - _sigmoid(0.5))) / 3  # beta (r - 0) = 0.5 and beta (0 - r) = 0.5
    assert loss.item() == pytest.approx(want, abs=1e-6)


def test_gradient_raises_desirable_lowers_undesirable_and_skips_z0() -> None:
    lp = _batch()
    lp.logps.requires_grad_(True)
    lp.kl_logps.requires_grad_(True)
    kto(lp, beta=0.5)[0].backward()
    # dL/dr = -(1/3) beta sigmoid(x)(1 - sigmoid(x)) for a desirable example (x = 0.35), +(1/3) beta s(1 - s) for
    # the undesirable one (x = 0.65): descent raises the desirable log-probs and lowers the undesirable one
    g_d = -0.5 * _sigmoid(0.35) * (1 - _sigmoid(0.35)) / 3
    g_u = 0.5 * _sigmoid(0.65) * (1 - _sigmoid(0.65)) / 3
    assert lp.logps.grad.tolist() == pytest.approx([g_d, g_u, g_d], abs=1e-7)
    assert g_d < 0 < g_u
    assert lp.kl_logps.grad is None  # z0 is detached: no gradient reaches the KL rows


def test_a_batch_of_one_class_reports_only_that_class() -> None:
    lp = _batch()
    lp.desirable = torch.tensor([True, True, True])
    loss, stats = kto(lp, beta=0.5)
    # r = 1, -1, 1 all desirable: (2 (1 - sigmoid(0.35)) + 1 - sigmoid(0.5 (-1 - 0.3))) / 3
    want = (2 * (1 - _sigmoid(0.35)) + 1 - _sigmoid(-0.65)) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert "rewards/undesirable" not in stats and stats["rewards/desirable"].item() == pytest.approx(1 / 6)


def test_config_choices_checks_and_help() -> None:
    assert set(typing.get_args(typing.get_type_hints(KTOOptions)["loss"])) == set(UNPAIRED_LOSSES)
    cfg = load_config(KTOConfig, None, [])
    assert (cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight) == (0.1, 1.0, 1.0)
    assert cfg.kto.reference == "precompute"  # the reference options shared with dpo
    for bad in ("kto.beta=0", "kto.desirable_weight=0", "kto.undesirable_weight=-1", "kto.desirable_weight=inf"):
        with pytest.raises(ChatrlError, match=bad.split("=")[0]):
            load_config(KTOConfig, None, [bad])
    text = "\n".join(help_lines(KTOConfig))
    assert "[1, 4/3]" in text and "kto.reference_model" in text
