"""Continuous batching in `chatrl serve` (`serve.batching`): one forward per decode step for all active sequences,
rows joining and leaving between steps, and the same tokens as a request decoded alone.

Exactness: greedy decoding of the real (tiny) Llama is compared token for token. Seeded SAMPLING of that model is not:
fp32 GEMMs round differently for 1 row than for 8 (MKL picks other kernels for other shapes; measured: logits differ
by ~1e-7), and the tiny random model's near-uniform 49k-token distributions turn such last-bit differences into a
different sample now and then. So sampled exactness is checked on a stub whose logits are batch-invariant by
construction (a table lookup): that is what batching must not change — each row's own generator, settings and order.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM

from chatrl.models.ilql_heads import ILQLHeads
from chatrl.rollout.guided import QGuidance
from chatrl.serve.batching import BatchedRows, SerialRows, batchable, make_rows
from chatrl.serve.generation import ChatModel, Decoding, SamplingSettings
from chatrl.serve.worker import Event, GenerationWorker, Job

GREEDY = SamplingSettings(max_new_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def chat(tiny_model_dir: str) -> ChatModel:
    """The tiny random Llama with its weight matrices scaled x8. As initialised, its greedy answer to any prompt is
    one token repeated (198, every step), so "the same tokens" would hold trivially; scaled, each prompt gets its own
    16 varied tokens."""
    chat = ChatModel(tiny_model_dir, dtype="fp32")
    with torch.no_grad():
        for param in chat.model.parameters():
            if param.dim() > 1:
                param.mul_(8.0)
    return chat


def prompts(chat: ChatModel, n: int = 8) -> list[list[int]]:
    """n different prompts of different lengths."""
    return [chat.render([{"role": "user", "content": f"Question {i}: " + "tell me more " * i}]) for i in range(n)]


def run_engine(chat: ChatModel, requests: list[tuple[list[int], SamplingSettings]], joins: list[int] | None = None,
               block: int = 256, on_step=None) -> list[tuple[list[int], str, str | None]]:
    """Decode `requests` with one `BatchedRows`; request i joins before step joins[i] (default: all at step 0).
    Returns (completion ids, streamed text, finish reason) per request."""
    engine = BatchedRows(chat, block=block)
    decs = [chat.start(p, s) for p, s in requests]
    joins = joins or [0] * len(decs)
    texts = [""] * len(decs)
    step = 0
    while step <= max(joins) or engine.rows:
        new = [d for d, j in zip(decs, joins, strict=True) if j == step]
        results = (engine.admit(new) if new else []) + engine.step()
        for r in results:
            assert r.error is None, r.error
            texts[_index(decs, r.decoding)] += r.text
        if on_step:
            on_step(engine, step, decs)
        step += 1
    assert all(d.finish_reason for d in decs)
    return [(d.completion_ids, t, d.finish_reason) for d, t in zip(decs, texts, strict=True)]


def _index(decs: list[Decoding], dec: Decoding) -> int:
    return next(i for i, d in enumerate(decs) if d is dec)


def alone(chat: ChatModel, prompt: list[int], settings: SamplingSettings) -> tuple[list[int], str, str | None]:
    return run_engine(chat, [(prompt, settings)])[0]


def test_greedy_tokens_alone_equal_tokens_with_7_others(chat: ChatModel):
    assert batchable(chat.model) and isinstance(make_rows(chat), BatchedRows)
    ps = prompts(chat)
    solo = [alone(chat, p, GREEDY) for p in ps]
    assert run_engine(chat, [(p, GREEDY) for p in ps]) == solo
    assert all(len(ids) == 16 for ids, _, _ in solo) and len({tuple(ids) for ids, _, _ in solo}) == 8
    assert all(len(set(ids)) > 8 for ids, _, _ in solo)  # not one token repeated
    # and the batched path decodes what the one-sequence path (own DynamicCache, SDPA) decodes
    for p, (ids, text, reason) in zip(ps, solo, strict=True):
        dec = chat.start(p, GREEDY)
        assert (dec.run(), dec.completion_ids, dec.finish_reason) == (text, ids, reason)


def test_rows_join_midway_and_leave_early_with_their_own_budgets_and_stops(chat: ChatModel):
    ps = prompts(chat)
    budgets = [3, 20, 7, 12, 1, 16, 9, 5]
    settings = [SamplingSettings(max_new_tokens=b, temperature=0) for b in budgets]
    full = [alone(chat, p, s) for p, s in zip(ps, settings, strict=True)]
    # requests 1 and 5 also stop at a string from the middle of their answer
    for k in (1, 5):
        text = full[k][1]
        settings[k] = SamplingSettings(max_new_tokens=budgets[k], temperature=0, stop=[text[len(text) // 2:][:3]])
    solo = [alone(chat, p, s) for p, s in zip(ps, settings, strict=True)]
    for k in (1, 5):
        assert solo[k][2] == "stop" and full[k][1].startswith(solo[k][1]) and len(solo[k][1]) < len(full[k][1])
    sizes: list[int] = []
    together = run_engine(chat, list(zip(ps, settings, strict=True)), joins=[0, 0, 2, 3, 3, 6, 9, 14],
                          on_step=lambda engine, step, decs: sizes.append(len(engine.rows)))
    assert together == solo
    assert max(sizes) >= 4 and sizes[-1] == 0  # rows really overlapped, and all left


def test_capacity_grows_on_demand_and_shrinks_when_long_rows_leave(chat: ChatModel):
    ps = prompts(chat, 3)
    requests = [(ps[0], SamplingSettings(max_new_tokens=40, temperature=0)),
                (ps[1], SamplingSettings(max_new_tokens=4, temperature=0)),
                (ps[2], SamplingSettings(max_new_tokens=30, temperature=0))]
    seen: list[tuple[int, int, int]] = []

    def watch(engine: BatchedRows, step: int, decs) -> None:
        cache = engine.cache
        seen.append((step, cache.rows, cache.capacity))
        if cache.rows:
            # between steps: room for what is written, at most one 8-column block more (grows at the next step)
            assert cache.max_len <= cache.capacity <= cache.max_len + 8
            assert cache.layers[0].v_buf.shape[:3] == (cache.rows, cache.layers[0].v_buf.shape[1], cache.capacity)

    small = run_engine(chat, requests, joins=[0, 0, 20], block=8, on_step=watch)
    assert small == [alone(chat, p, s) for p, s in requests]
    capacities = [c for _, rows, c in seen if rows]
    assert len(set(capacities)) > 4  # it grew block by block (and shrank: request 2 joined shorter, 0 left first)
    assert capacities[-1] < max(capacities)
    assert seen[-1][1:] == (0, 0)


def test_dropped_row_frees_its_kv_row_and_the_others_go_on(chat: ChatModel):
    ps = prompts(chat, 3)
    solo = [alone(chat, p, GREEDY) for p in ps]
    engine = BatchedRows(chat)
    decs = [chat.start(p, GREEDY) for p in ps]
    engine.admit(decs)
    for _ in range(3):
        engine.step()
    engine.drop([decs[1]])
    assert engine.rows == [decs[0], decs[2]] and engine.cache.rows == 2
    assert engine.cache.lengths.tolist() == [len(ps[0]) + 3, len(ps[2]) + 3]
    while engine.rows:
        engine.step()
    assert [decs[0].completion_ids, decs[2].completion_ids] == [solo[0][0], solo[2][0]]
    assert decs[1].completion_ids == solo[1][0][:4] and decs[1].finish_reason is None
    assert engine.cache.rows == 0 and engine.cache.capacity == 0


class TableLM(torch.nn.Module):
    """Next-token logits looked up from a table by (last token, position): a row's logits are bit-identical whatever
    else is in the batch. Writes a dummy KV entry per token (so the caches fill as for a real model) and records the
    position ids and attention-mask widths it was given."""

    def __init__(self, vocab: int = 26):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(97, vocab, generator=torch.Generator().manual_seed(0)) * 2,
                                        requires_grad=False)
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, max_position_embeddings=10**6)
        self.calls: list[tuple[list[int], list[int]]] = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, cache):
        b, t = input_ids.shape
        cache.update(torch.zeros(b, 1, t, 2), torch.zeros(b, 1, t, 2), 0)
        self.calls.append((position_ids[:, -1].tolist(), attention_mask.sum(-1).tolist()))
        logits = self.table[(input_ids * 31 + position_ids * 7) % self.table.shape[0]]  # [b, t, V]
        return SimpleNamespace(logits=logits[:, logits_to_keep])


class LetterTokenizer:
    """Token i decodes to the i-th letter. No EOS."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_seeded_sampling_is_unchanged_by_batching_when_logits_are():
    model = TableLM()
    chat = ChatModel.from_model(model, LetterTokenizer())
    assert batchable(model)
    ps = [[i % 26] * (1 + i) for i in range(8)]
    settings = [SamplingSettings(max_new_tokens=10 + i, temperature=0.5 + i / 4, top_p=[1.0, 0.9, 0.6][i % 3],
                                 seed=100 + i, stop=["xy"] if i == 3 else []) for i in range(8)]
    solo = [alone(chat, p, s) for p, s in zip(ps, settings, strict=True)]
    model.calls.clear()
    together = run_engine(chat, list(zip(ps, settings, strict=True)), joins=[0, 1, 1, 2, 4, 4, 7, 8])
    assert together == solo
    assert len({tuple(ids) for ids, _, _ in solo}) == 8
    # every decode step: one row per live request, each at its own position, its mask one column wider
    decode_calls = [c for c in model.calls if len(c[0]) > 1]
    assert decode_calls and all(w == p + 1 for pos, widths in decode_calls for p, w in zip(pos, widths, strict=True))
    assert max(len(pos) for pos, _ in decode_calls) >= 6


def test_n_choices_share_one_prefill_and_sample_with_their_own_seeds():
    model = TableLM()
    chat = ChatModel.from_model(model, LetterTokenizer())
    s = SamplingSettings(max_new_tokens=12, temperature=1.0, seed=7)
    engine = BatchedRows(chat)
    decs = [chat.start([1, 2, 3], s, seed_offset=i) for i in range(3)]
    engine.admit(decs)
    assert len(model.calls) == 1 and engine.cache.rows == 3  # one prefill forward, three rows
    while engine.rows:
        engine.step()
    for i, d in enumerate(decs):
        ref = chat.start([1, 2, 3], s, seed_offset=i)
        alone_engine = BatchedRows(chat)
        alone_engine.admit([ref])
        while alone_engine.rows:
            alone_engine.step()
        assert d.completion_ids == ref.completion_ids
    assert len({tuple(d.completion_ids) for d in decs}) == 3


def collect(worker: GenerationWorker, jobs: list[tuple[list[int], SamplingSettings, int]]) -> list[list[str]]:
    """Submit all jobs at once; wait for every choice to end; the streamed text of each choice."""
    texts = [[""] * n for _, _, n in jobs]
    left = threading.Semaphore(0)

    def sink_for(j: int):
        def sink(ev: Event) -> None:
            assert ev.error is None, ev.error
            texts[j][ev.index] += ev.text
            if ev.finish_reason:
                left.release()
        return sink

    for j, (p, s, n) in enumerate(jobs):
        worker.submit(Job(p, s, sink_for(j), n=n))
    for _ in range(sum(n for _, _, n in jobs)):
        assert left.acquire(timeout=120), "the worker did not finish"
    return texts


def test_worker_serves_concurrent_requests_as_if_each_were_alone(chat: ChatModel):
    worker = GenerationWorker(chat, max_active=8).start()
    try:
        assert isinstance(worker._rows, BatchedRows)
        jobs = [(p, SamplingSettings(max_new_tokens=6 + 2 * i, temperature=0), 1) for i, p in enumerate(prompts(chat))]
        jobs[2] = (jobs[2][0], jobs[2][1], 2)  # n = 2 (greedy: both choices equal)
        solo = [collect(worker, [job])[0] for job in jobs]
        assert collect(worker, jobs) == solo
        assert solo[2][0] == solo[2][1]
    finally:
        worker.stop()


def test_cancelled_request_leaves_the_batch(chat: ChatModel):
    worker = GenerationWorker(chat, max_active=8).start()
    try:
        started = threading.Event()
        long_job = Job(prompts(chat, 1)[0], SamplingSettings(max_new_tokens=2000, temperature=0),
                       sink=lambda ev: started.set())
        worker.submit(long_job)
        assert started.wait(60)
        short = prompts(chat, 2)[1]
        expected = collect(worker, [(short, GREEDY, 1)])  # decoded while the long one runs
        long_job.cancel()
        for _ in range(600):
            if worker.load == (0, 0) and not worker._rows.rows:
                break
            threading.Event().wait(0.05)
        assert worker.load == (0, 0) and worker._rows.cache.rows == 0
        assert collect(worker, [(short, GREEDY, 1)]) == expected  # and the worker goes on
    finally:
        worker.stop()


def test_q_guided_model_runs_batched_and_exact(chat: ChatModel):
    config = chat.model.config
    heads = ILQLHeads(config.hidden_size, config.vocab_size, init_std=1.0, seed=3)
    guided = ChatModel.from_model(chat.model, chat.tokenizer, guidance=QGuidance(heads, beta=2.0))
    assert batchable(guided.model) and isinstance(make_rows(guided), BatchedRows)
    ps = prompts(guided, 4)
    solo = [alone(guided, p, GREEDY) for p in ps]
    assert run_engine(guided, [(p, GREEDY) for p in ps], joins=[0, 1, 1, 5]) == solo
    for p, (ids, _, _) in zip(ps, solo, strict=True):
        dec = guided.start(p, GREEDY)
        dec.run()
        assert dec.completion_ids == ids  # = the one-sequence path, through the same QGuidedLM
    assert [ids for ids, _, _ in solo] != [alone(chat, p, GREEDY)[0] for p in ps]  # the heads do shift the logits


def test_model_with_sliding_window_layers_falls_back_to_one_sequence_at_a_time(chat: ChatModel):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=chat.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, use_sliding_window=True, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"])
    hybrid = ChatModel.from_model(Qwen2ForCausalLM(config).eval(), chat.tokenizer)
    assert not batchable(hybrid.model) and isinstance(make_rows(hybrid), SerialRows)
    ps = prompts(hybrid, 3)
    expected = []
    for p in ps:
        dec = hybrid.start(p, GREEDY)
        expected.append([dec.run()])
    worker = GenerationWorker(hybrid, max_active=8).start()
    try:
        assert isinstance(worker._rows, SerialRows)
        assert collect(worker, [(p, GREEDY, 1) for p in ps]) == expected
    finally:
        worker.stop()
