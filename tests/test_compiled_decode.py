"""Compiled decode step (rollout.compile): same logits / greedy tokens as the model, weights refreshed without
recompiling, unsupported models fall back with a warning. One compilation of the tiny model (~15 s) serves all."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatrl.rollout.compiled_decode import CompiledDecoder, why_unsupported
from chatrl.rollout.decode import _logits, _prefill_positions, decode_attention_enabled, make_cache
from chatrl.rollout.hybrid import HybridEngine
from helpers import NEW, PAD, greedy, hf_greedy, left_padded, pick_eos, rollout, tiny_model, train_steps


def teacher_forced_gap(model, decoder: CompiledDecoder, steps: int = 5) -> float:
    """Largest |logit difference| between the model's forward and the compiled step, same tokens fed to both."""
    ids, mask = left_padded()
    b, plen = ids.shape
    with decode_attention_enabled(model):
        eager_cache, compiled_cache = make_cache(model, plen + steps), make_cache(model, plen + steps, zeroed=True)
        pos = _prefill_positions(mask)
        eager = _logits(model, ids, mask, pos, eager_cache)
        _logits(model, ids, mask, pos, compiled_cache)
        full_mask = torch.cat([mask, torch.ones(b, steps, dtype=mask.dtype)], dim=1)
        weights, nxt, gap = decoder.weights(model), pos[:, -1] + 1, 0.0
        for t in range(steps):
            tok = eager.argmax(-1)
            eager = _logits(model, tok[:, None], full_mask[:, : plen + t + 1], nxt[:, None], eager_cache)
            got = decoder.step(weights, tok, nxt, plen + t, full_mask, compiled_cache)
            gap = max(gap, float((eager - got).abs().max().nan_to_num(nan=float("inf"))))  # max(0.0, nan) is 0.0
            nxt = nxt + 1
    return gap


@pytest.fixture(scope="module")
def compiled_engine(tiny_model_dir):
    """A tiny fp32 actor with a compiled-decode Hybrid Engine (fp32 copy: comparable to HF bit for bit-ish)."""
    model = tiny_model(tiny_model_dir)
    return model, HybridEngine(model, inference_dtype=torch.float32, release_after_rollout=False,
                               compile_decode=True)


def test_compiled_step_logits_match_the_model(compiled_engine):
    _, he = compiled_engine
    with he.inference_mode() as inf:
        decoder = he._decoder_for(inf)
        assert decoder is not None
        assert teacher_forced_gap(inf, decoder) < 1e-4


def test_greedy_rollout_matches_hf_and_follows_weight_updates_without_recompiling(compiled_engine):
    model, he = compiled_engine
    ids, mask = left_padded()
    eos = pick_eos(model, ids, mask, NEW)  # an EOS some rows emit early: rows are dropped mid-rollout
    assert torch.equal(rollout(he, eos), hf_greedy(model.eval(), ids, mask, NEW, eos))
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled_graphs >= 1

    train_steps(model, 3)
    he.mark_weights_updated()
    want = hf_greedy(model.eval(), ids, mask, NEW, eos)
    assert torch.equal(rollout(he, eos), want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs  # new weights, same graph


def test_unwritten_cache_slots_cannot_poison_the_rollout(compiled_engine, monkeypatch):
    """The compiled step attends over the slab's whole capacity, masking slots not written yet; uninitialised
    memory there can hold NaN, which survives the mask (NaN - inf, 0 * NaN) and made this rollout flaky (token 0
    from NaN logits, ~1 run in 4). Poison every slab that is not allocated zeroed: the compiled rollout must still
    equal HF's, and so must the eager one (it reads only the written prefix)."""
    from chatrl.rollout import decode

    init = decode._SlabLayer.lazy_initialization

    def poisoned(self, key_states, value_states):
        init(self, key_states, value_states)
        if not getattr(self, "zeroed", False):
            self.kt_buf.fill_(float("nan"))
            self.v_buf.fill_(float("nan"))

    monkeypatch.setattr(decode._SlabLayer, "lazy_initialization", poisoned)
    model, he = compiled_engine
    ids, mask = left_padded()
    eos = pick_eos(model, ids, mask, NEW)
    want = hf_greedy(model.eval(), ids, mask, NEW, eos)
    assert torch.equal(rollout(he, eos), want)
    assert torch.equal(decode.generate(model, ids, mask, greedy(), eos, PAD)[0], want)


def test_unsupported_model_falls_back_with_a_warning():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    assert "bias" in why_unsupported(model)
    with pytest.raises(ValueError, match="bias"):
        CompiledDecoder(model)
    he = HybridEngine(model, inference_dtype=None, compile_decode=True)
    ids = torch.randint(3, 64, (2, 4))
    with pytest.warns(UserWarning, match="rollout.compile: biases"):
        out, _ = he.generate(ids, torch.ones_like(ids), greedy(), eos_token_id=-1, pad_token_id=PAD)
    assert out.shape == (2, NEW) and he.compile_decode is False
