"""Fast decoder (`chatrl.rollout.decode`) against transformers' own `model.generate`, plus sampling rules. The tiny
model, its prompts and the greedy references are in tests/helpers.py (the Hybrid Engine's tests use them too)."""

from __future__ import annotations

import warnings

import pytest
import torch

from chatrl.algorithms.losses import token_logprobs
from chatrl.rollout.decode import GenerationSettings, generate, response_mask_from_ids
from chatrl.rollout.sampling import _top_p_filter, pick_tokens
from helpers import (
    LENS,
    PAD,
    assert_bf16_greedy_within_rounding,
    greedy,
    hf_greedy,
    left_padded,
    pick_eos,
    tiny_model,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model(tiny_model_dir)


@pytest.mark.parametrize("check_every", [1, 3])
def test_greedy_matches_hf_generate_with_eos_stopping(model, check_every):
    ids, mask = left_padded()
    eos = pick_eos(model, ids, mask, 12)
    ref = hf_greedy(model, ids, mask, 12, eos)
    got, got_mask = generate(model, ids, mask, greedy(12), eos, PAD, check_every=check_every)
    assert torch.equal(got, ref)
    stopped = (got == eos).any(dim=1)
    assert stopped.any() and not stopped.all(), "test must exercise early stopping and row dropping"
    assert torch.equal(got_mask, response_mask_from_ids(ref, eos))
    # Mask is 1 up to and including EOS, pads after.
    row = int(stopped.nonzero()[0])
    first = int((got[row] == eos).nonzero()[0])
    assert got_mask[row, : first + 1].all() and not got_mask[row, first + 1:].any()
    assert (got[row, first + 1:] == PAD).all()


def test_greedy_bf16_matches_hf_generate(tiny_model_dir):
    """bf16 with transformers' SDPA attention is exact too (same kernels; dropping rows does not change the
    other rows' numerics here). Our decode attention is a different kernel: in bf16 a near-tie can flip (then the
    row diverges), so it is held to bf16 rounding instead (`assert_bf16_greedy_within_rounding`).
    Measured on this shape: 59 of 60 tokens equal HF's greedy ones (one row diverges at a tie); over 20 model and
    prompt seeds 65-100% are (so a token-agreement bound is seed luck); the rounding bounds hold on all 20."""
    model = tiny_model(tiny_model_dir, torch.bfloat16)
    ids, mask = left_padded()
    eos = pick_eos(model, ids, mask, 10)
    ref = hf_greedy(model, ids, mask, 10, eos)
    got, _ = generate(model, ids, mask, greedy(10), eos, PAD, fast_attention=False)
    assert torch.equal(got, ref)
    fast, fast_mask, logps = generate(model, ids, mask, greedy(10), eos, PAD, return_logprobs=True)
    assert fast.shape == ref.shape
    assert_bf16_greedy_within_rounding(model, ids, mask, fast, fast_mask, logps)


def test_decode_attention_matches_sdpa_fp32():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from chatrl.rollout.decode import decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 6, n, 8, generator=g) for n in (1, 11, 11))
    k, v = k[:, :2], v[:, :2]  # 6 query heads on 2 kv heads
    mask = torch.ones(4, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, _ = decode_attention(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_stops_when_all_rows_finish_and_respects_max_new_tokens(model):
    ids, mask = left_padded()
    free, free_mask = generate(model, ids, mask, greedy(7), eos_token_id=-1, pad_token_id=PAD)
    assert free.shape == (len(LENS), 7) and free_mask.all()
    # EOS = every row's first greedy token: all rows stop at step 0, output is one column.
    ids1, mask1 = ids[:1], mask[:1]
    eos = int(free[0, 0])
    one, one_mask = generate(model, ids1, mask1, greedy(7), eos, PAD)
    assert one.tolist() == [[eos]] and one_mask.tolist() == [[1]]


def test_min_new_tokens_blocks_eos(model):
    ids, mask = left_padded()
    eos = int(hf_greedy(model, ids, mask, 1, eos=None)[0, 0])  # row 0 would stop at once
    got, got_mask = generate(model, ids, mask, greedy(6, min_new_tokens=3), eos, PAD)
    assert not (got[:, :3] == eos).any()
    assert got_mask[:, :3].all()
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                         min_new_tokens=3, eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(got, ref)


def test_sampling_top_k_1_is_greedy_and_seed_reproducible(model):
    ids, mask = left_padded()
    want, _ = generate(model, ids, mask, greedy(8), -1, PAD)
    top1 = GenerationSettings(max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7, seed=3)
    assert torch.equal(generate(model, ids, mask, top1, -1, PAD)[0], want)
    s = GenerationSettings(max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, seed=5)
    a, b = generate(model, ids, mask, s, -1, PAD)[0], generate(model, ids, mask, s, -1, PAD)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, want), "sampling at T=1 over 20 tokens should leave the greedy path"


def test_logprobs_match_training_forward(model):
    """Log-probs returned while decoding == those of one teacher-forced forward over prompt + response, under the
    full softmax at the sampling temperature (not the top-k-truncated one, not EOS-blocked by min_new_tokens)."""
    ids, mask = left_padded()
    s = GenerationSettings(max_new_tokens=9, min_new_tokens=2, do_sample=True, temperature=1.3, top_k=30, seed=1)
    with torch.no_grad():  # EOS = row 0's likeliest first token, so blocking it at step 0 moves row 0's log-probs
        first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    eos = int(first[0, -1].argmax())
    assert torch.softmax(first[0, -1] / 1.3, -1)[eos] > 0.01  # log(1 - p_eos) < -0.01: far outside the tolerance
    resp, resp_mask, logps = generate(model, ids, mask, s, eos_token_id=eos, pad_token_id=PAD, return_logprobs=True)
    full = torch.cat([ids, resp], dim=1)
    full_mask = torch.cat([mask, resp_mask], dim=1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.float()
    p = ids.shape[1]
    step_logits = logits[:, p - 1: -1]  # logits that predicted each response token
    want = torch.log_softmax(step_logits / 1.3, -1).gather(2, resp[..., None]).squeeze(2) * resp_mask
    assert logps.shape == resp.shape
    torch.testing.assert_close(logps, want, atol=1e-4, rtol=1e-4)
    assert (logps[resp_mask == 0] == 0).all() and (logps[resp_mask == 1] < 0).all()


def test_response_mask_hand_computed():
    ids = torch.tensor([[5, 7, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert response_mask_from_ids(ids, 2).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_top_p_filter_hand_computed():
    # probs 0.5, 0.3, 0.2 (log-space input): top_p=0.7 keeps 0.5 and 0.3 (mass before 0.2 is 0.8 >= 0.7).
    sorted_logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = _top_p_filter(sorted_logits, 0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False]]
    assert torch.isfinite(_top_p_filter(sorted_logits, 0.4)).tolist() == [[True, False, False]]


def test_pick_tokens_top_k_never_leaves_the_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 4.5]]).repeat(200, 1)
    s = GenerationSettings(do_sample=True, top_k=2, seed=0)
    toks = pick_tokens(logits, s, s.make_generator(torch.device("cpu")))
    assert set(toks.tolist()) == {1, 4}
    lp = token_logprobs(logits[:1, None], torch.tensor([[1]]))
    assert abs(float(lp) - float(torch.log_softmax(logits[0], -1)[1])) < 1e-6


def test_sampler_follows_the_distribution_and_skips_excluded_tokens():
    # probs 0.5 / 0.3 / 0.2 on columns 0, 2, 3; column 1 excluded (-inf): 20k draws land within 0.015 of each.
    logits = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).log().repeat(20000, 1)
    s = GenerationSettings(do_sample=True, seed=0)
    toks = pick_tokens(logits, s, s.make_generator(torch.device("cpu")))
    freq = torch.bincount(toks, minlength=4).float() / toks.numel()
    assert freq[1] == 0
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.015, rtol=0)


def _warn_as(module: str, category: type[Warning], message: str = "old API") -> None:
    """`warnings.warn` from a frame whose module is `module` (the name a warning is attributed to)."""
    code = compile("warnings.warn(message, category, stacklevel=1)", f"<{module}>", "exec")
    exec(code, {"__name__": module, "warnings": warnings, "message": message, "category": category})


def test_warning_filters_error_on_chatrl_attributed_deprecations_only():
    """pyproject's filterwarnings (active inside every test): chatrl-attributed Deprecation/FutureWarnings error,
    a third-party library's own internal ones stay warnings."""
    for category in (FutureWarning, DeprecationWarning):
        with pytest.raises(category):
            _warn_as("chatrl.rollout.decode", category)
        with pytest.raises(category):
            _warn_as("chatrl", category)
    with warnings.catch_warnings(record=True) as seen:  # keeps the active filters, only records
        _warn_as("transformers.modeling_utils", FutureWarning, "`is_gradient_checkpointing` is deprecated")
        _warn_as("peft.tuners.lora", DeprecationWarning)
        _warn_as("chatrl_elsewhere", FutureWarning)  # a name that only starts with "chatrl"
    assert [w.category for w in seen] == [FutureWarning, DeprecationWarning, FutureWarning]


def test_warning_filters_error_on_deprecated_model_kwargs(model):
    """transformers' `deprecate_kwarg` on forward warns with stacklevel=2, attributing the warning to torch's
    Module._call_impl rather than to the caller: the torch-module filter catches chatrl passing an old keyword."""
    from transformers.cache_utils import DynamicCache

    from chatrl.rollout.decode import cache_kwarg

    if cache_kwarg(model) != "cache":
        pytest.skip("this transformers has no `cache` keyword: `past_key_values` is current, nothing is deprecated")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(FutureWarning, match="past_key_values"):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True)  # the current keyword: no error


def test_pad_is_never_sampled(model):
    """A model whose logits favour the pad token (+30 on it: p(pad) ~ 1) still never emits pad inside a reply, sampled
    or greedy; with pad == eos the pad is EOS and is emitted (it ends the reply)."""
    ids, mask = left_padded()
    bias = torch.zeros(model.config.vocab_size)
    bias[PAD] = 30.0
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        sample = GenerationSettings(max_new_tokens=6, do_sample=True, seed=3)
        for s in (sample, greedy(6)):
            resp, resp_mask = generate(model, ids, mask, s, eos_token_id=-1, pad_token_id=PAD)
            assert resp.shape == (len(LENS), 6) and resp_mask.all()
            assert not (resp == PAD).any()
        resp, resp_mask = generate(model, ids, mask, sample, eos_token_id=PAD, pad_token_id=PAD)
        assert (resp[:, 0] == PAD).all() and resp_mask.sum(1).tolist() == [1] * len(LENS)
    finally:
        hook.remove()
