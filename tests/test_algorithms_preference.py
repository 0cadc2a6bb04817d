"""The DPO family against hand-computed numbers (formulas in chatrl/algorithms/preference.py)."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from chatrl.algorithms.preference import PREFERENCE_LOSSES, REFERENCE_FREE, PairLogps
from chatrl.config_offline import DPOConfig, DPOOptions
from chatrl.configbase import help_lines, load_config
from chatrl.errors import ChatrlError
from chatrl.models import loading
from chatrl.steps.dpo import preference_loss
from chatrl.steps.dpo_reference import reference_dtype


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


def test_ipo_on_summed_log_ratios_by_hand() -> None:
    # (h - 1 / (2 beta))^2 = (2 - 1)^2 with beta 0.5; with beta 0.25: (2 - 2)^2 = 0
    ipo = PREFERENCE_LOSSES["ipo"]
    assert ipo(_pair(), beta=0.5, ipo_logratio="sum")[0].item() == pytest.approx(1.0, abs=1e-6)
    assert ipo(_pair(), beta=0.25, ipo_logratio="sum")[0].item() == pytest.approx(0.0, abs=1e-7)
    # chosen ratio +1 over 5 tokens, rejected -12 - (-10) = -2 over 4 tokens: h = 3; beta 0.5: (3 - 1)^2 = 4
    loss, stats = ipo(_pair(ref_rejected=-10.0), beta=0.5, ipo_logratio="sum")
    assert loss.item() == pytest.approx(4.0, abs=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5) and stats["rewards/rejected"].item() == pytest.approx(-1.0)


def test_ipo_on_per_token_log_ratios_by_hand_is_the_default() -> None:
    ipo = PREFERENCE_LOSSES["ipo"]
    # chosen ratio +1 / 5 tokens = 0.2, rejected -2 / 4 tokens = -0.5: h = 0.7; beta 0.5: (0.7 - 1)^2 = 0.09
    # (lengths swapped: 1/4 + 2/5 = 0.65 -> 0.1225; summed: 4)
    lp = _pair(ref_rejected=-10.0)
    loss, stats = ipo(lp, beta=0.5, ipo_logratio="token_mean")
    assert loss.item() == pytest.approx(0.09, abs=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(0.1) and stats["rewards/rejected"].item() == pytest.approx(-0.25)
    assert ipo(lp, beta=0.5)[0].item() == pytest.approx(0.09, abs=1e-6)  # the default
    # beta 0.25: (0.7 - 2)^2 = 1.69
    assert ipo(lp, beta=0.25)[0].item() == pytest.approx(1.69, abs=1e-6)
    with pytest.raises(ValueError, match="ipo_logratio"):
        ipo(lp, beta=0.5, ipo_logratio="mean")


def test_ipo_per_token_target_does_not_depend_on_length() -> None:
    # two pairs with the same per-token log-ratios (+0.3 chosen, -0.2 rejected), 10 and 100 tokens long:
    # per token h = 0.5 = 1 / (2 beta) at beta 1 for both -> loss 0; summed h = 5 and 50 -> (4.5^2 + 49.5^2) / 2
    n = torch.tensor([10.0, 100.0])
    lp = PairLogps(chosen=0.3 * n - 20, rejected=-0.2 * n - 20, chosen_len=n, rejected_len=n,
                   ref_chosen=torch.full((2,), -20.0), ref_rejected=torch.full((2,), -20.0))
    assert PREFERENCE_LOSSES["ipo"](lp, beta=1.0)[0].item() == pytest.approx(0.0, abs=1e-9)
    summed = PREFERENCE_LOSSES["ipo"](lp, beta=1.0, ipo_logratio="sum")[0].item()
    assert summed == pytest.approx((4.5 ** 2 + 49.5 ** 2) / 2, rel=1e-6)  # 1235.25


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


def test_dpo_step_passes_ipo_logratio_and_refuses_it_elsewhere() -> None:
    lp = _pair(ref_rejected=-10.0)
    per_token = load_config(DPOConfig, None, ["dpo.loss=ipo", "dpo.beta=0.5"])
    summed = load_config(DPOConfig, None, ["dpo.loss=ipo", "dpo.beta=0.5", "dpo.ipo_logratio=sum"])
    assert per_token.dpo.ipo_logratio == "token_mean"
    assert preference_loss(per_token, lp)[0].item() == pytest.approx(0.09, abs=1e-6)
    assert preference_loss(summed, lp)[0].item() == pytest.approx(4.0, abs=1e-6)
    with pytest.raises(ChatrlError, match="dpo.ipo_logratio applies to dpo.loss=ipo"):
        load_config(DPOConfig, None, ["dpo.loss=sigmoid", "dpo.ipo_logratio=sum"])
    assert "dpo.ipo_logratio ('token_mean' | 'sum', default 'token_mean')" in "\n".join(help_lines(DPOConfig))


def test_reference_dtype_auto_is_the_policys(monkeypatch) -> None:
    """On a CPU with native bf16 (where model.dtype=auto means bf16), an fp32 policy still gets an fp32 reference:
    at step 1 both score the pairs alike (a bf16 reference gave a margin of 5e-4 instead of 0)."""
    monkeypatch.delenv("CHATRL_AUTO_DTYPE", raising=False)  # auto as the machine decides it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: True)
    assert reference_dtype(load_config(DPOConfig, None, ["model.dtype=fp32"]), "dpo") == "fp32"
    assert reference_dtype(load_config(DPOConfig, None, ["model.dtype=auto"]), "dpo") == "bf16"
    bf16_ref = load_config(DPOConfig, None, ["model.dtype=fp32", "dpo.reference_dtype=bf16"])
    assert reference_dtype(bf16_ref, "dpo") == "bf16"
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: False)
    assert reference_dtype(load_config(DPOConfig, None, ["model.dtype=bf16"]), "dpo") == "bf16"
    assert reference_dtype(load_config(DPOConfig, None, ["model.dtype=auto"]), "dpo") == "fp32"
