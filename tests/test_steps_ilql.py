"""`chatrl ilql`: data -> trajectories, heads on disk, Q-guided decoding (Hybrid Engine, chat), and a tiny run
through the CLI whose Q-guided decoding earns more of the offline reward than the plain LM."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from chatrl.batches import pad_rows
from chatrl.config_offline import ILQLConfig
from chatrl.configbase import load_config
from chatrl.data.tokenize import encode_prompt
from chatrl.errors import ChatrlError
from chatrl.models.ilql_heads import META_FILE, ILQLHeads, load_heads, save_heads
from chatrl.models.loading import load_frozen_causal_lm, load_tokenizer
from chatrl.rollout.decode import generate
from chatrl.rollout.guided import QGuidance, QGuidedLM
from chatrl.rollout.hybrid import HybridEngine
from chatrl.rollout.sampling import GenerationSettings
from chatrl.serve.generation import ChatModel, SamplingSettings
from chatrl.steps.ilql import collate_ilql, encode_scored, ilql_rows
from helpers import REPO, cli_env, kill_after_checkpoint, load_with_plain_transformers, run_cli, same_weights

TINY = "configs/tiny-ilql.yaml"
MARKER = "banana"
FRUITS = ["apple", "apple", "cherry", "cherry", "banana"]  # the rewarded reply is the rarest one


def fruit_prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Name a fruit. ({i})"}]


def write_fruit_data(path: Path, n: int = 300, seed: int = 0) -> Path:
    """{prompt, response, reward} rows: "I like <fruit>"; reward 1 when the fruit is the marker, else 0. The fruit is
    the reply's last word, so the state that earns the reward differs from the others by its own input token (a
    2-layer random model learns that in a few dozen steps; a period after it would need attention to learn first)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            fruit = rng.choice(FRUITS)
            f.write(json.dumps({"prompt": fruit_prompt(i)[0]["content"], "response": f"I like {fruit}",
                                "reward": float(fruit == MARKER)}) + "\n")
    return path


# ----------------------------------------------------------------------------- data


def test_collate_ilql_by_hand() -> None:
    # row 0: 5 tokens, reply = tokens 3, 4 -> actions at states 2, 3 (a_2 = 13, a_3 = 14), reward 2 at state 3
    # row 1: 4 tokens, reply = tokens 1, 2, 3 -> actions at states 0, 1, 2, reward -1 at state 2
    # windows: row 0 from state 2, row 1 from state 0; width = max span = 3
    rows = [{"input_ids": [10, 11, 12, 13, 14], "labels": [-100, -100, -100, 13, 14], "reward": 2.0},
            {"input_ids": [20, 21, 22, 23], "labels": [-100, 21, 22, 23], "reward": -1.0}]
    b = collate_ilql(rows, pad_id=0)
    assert b.positions.tolist() == [[2, 3, 4], [0, 1, 2]]
    assert b.actions.tolist() == [[13, 14, 0], [21, 22, 23]]
    assert b.action_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.rewards.tolist() == [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]


def _cfg(tmp_path: Path, *paths: Path, extra: tuple[str, ...] = ()) -> ILQLConfig:
    return load_config(ILQLConfig, None, [f"data.paths=[{','.join(map(str, paths))}]", "data.split=0,1,1",
                                          "data.eval_fraction=0", f"output_dir={tmp_path}", *extra])


def test_pairs_and_scored_rows_become_scored_replies(tmp_path: Path, tiny_model_dir: str) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "good answer", "rejected": "bad"}) + "\n"
                             for i in range(6)))
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"prompt": f"S{i}?", "response": "hi", "reward": "0.5"}) + "\n"
                              for i in range(6)))
    tok = load_tokenizer(tiny_model_dir)
    train, _ = ilql_rows(_cfg(tmp_path, pairs, scored), tok)
    rewards = sorted(r["reward"] for r in train)
    # split 0,1,1: half of each file lands in the reward shard (pairs: +1 and -1 each), half in the rlhf shard
    # (scored rows: their reward, "0.5" as CSV would give it; the pairs' prompts there carry no score)
    assert rewards == [-1.0] * 3 + [0.5] * 3 + [1.0] * 3
    for r in train:  # the labels mark exactly the reply (+ end of turn), the actions
        reply = tok.decode([t for t in r["labels"] if t != -100])
        assert reply.startswith(("good answer", "bad", "hi")) and "?" not in reply


def test_long_rows_keep_the_reply_end(tiny_model_dir: str) -> None:
    tok = load_tokenizer(tiny_model_dir)
    data = load_config(ILQLConfig, None, ["data.max_prompt_length=8", "data.max_length=20"]).data
    row = encode_scored(tok, [{"role": "user", "content": "word " * 50}], "a short reply", 1.0, "f:1", data)
    full = encode_scored(tok, [{"role": "user", "content": "hi"}], "a short reply", 1.0, "f:1",
                         load_config(ILQLConfig, None, []).data)
    # the prompt kept its last 8 tokens; the reply (the actions, where the reward sits) is whole
    assert row is not None and len(row["input_ids"]) <= 20
    assert row["input_ids"][-5:] == full["input_ids"][-5:]
    assert [t for t in row["labels"] if t != -100] == [t for t in full["labels"] if t != -100]
    data.overlength = "drop"
    assert encode_scored(tok, [{"role": "user", "content": "word " * 50}], "a short reply", 1.0, "f:1", data) is None


@pytest.mark.parametrize("value", ['"lots"', "true", "null", '"nan"'])
def test_bad_reward_is_one_line_naming_file_line_field(tmp_path: Path, tiny_model_dir: str, value: str) -> None:
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(f'{{"prompt": "S{i}?", "response": "hi", "reward": {value if i == 4 else 1}}}\n'
                              for i in range(6)))
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ChatrlError) as err:
        ilql_rows(_cfg(tmp_path, scored, extra=("data.split=0,0,1",)), tok)
    assert f"{scored}:5: field 'reward'" in str(err.value) and "\n" not in str(err.value)
    train, _ = ilql_rows(_cfg(tmp_path, scored, extra=("data.split=0,0,1", "data.skip_bad_rows=true")), tok)
    assert len(train) == 5


# ----------------------------------------------------------------------------- heads on disk


def test_heads_round_trip_through_safetensors(tmp_path: Path) -> None:
    heads = ILQLHeads(8, 32, seed=3)
    with torch.no_grad():
        heads.q1_target.weight.add_(1.0)  # targets differ from the online heads: both must be saved
    save_heads(heads, tmp_path, beta=2.5)
    loaded, meta = load_heads(tmp_path)
    assert (meta.hidden_size, meta.vocab_size, meta.two_q, meta.beta) == (8, 32, True, 2.5)
    want = {k: v for k, v in heads.state_dict().items() if k != "polyak_step"}
    got = loaded.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not any(p.name.endswith((".bin", ".pt")) for p in tmp_path.iterdir())


def test_bad_heads_files_give_one_line_errors(tmp_path: Path) -> None:
    save_heads(ILQLHeads(8, 32), tmp_path, beta=1.0)
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "beta": "high"}))
    with pytest.raises(ChatrlError, match=r"ilql_heads.json: field 'beta' must be a finite number"):
        load_heads(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "vocab_size": 31}))
    with pytest.raises(ChatrlError, match=r"does not match ilql_heads.json"):
        load_heads(tmp_path)


# ----------------------------------------------------------------------------- Q-guided decoding


def varied_model(model_dir: str) -> LlamaForCausalLM:
    """The tiny architecture with a large init, so greedy tokens vary from step to step."""
    config = LlamaConfig.from_pretrained(model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def one_token_heads(model: LlamaForCausalLM, token: int, q_value: float, v_value: float = 5.0) -> ILQLHeads:
    """Heads with Q(s, token) = q_value and Q(s, other) = 0 in every state (target heads: they guide decoding),
    and V(s) = v_value (a constant V must not change which token wins)."""
    heads = ILQLHeads(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        for head in heads.target_q():
            head.bias[token] = q_value
        heads.v[-1].bias.fill_(v_value)
    return heads


@pytest.fixture(scope="module")
def constructed(tiny_model_dir: str):
    """A model, a prompt, and its plain greedy first-step logits: top token, runner-up and their gap."""
    model = varied_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, 7), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    top, second = logits.topk(2).indices.tolist()
    return model, ids, mask, top, second, float(logits[top] - logits[second])


def greedy(new: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=new, do_sample=False)


def test_beta_zero_equals_greedy_of_the_plain_lm(constructed) -> None:
    model, ids, mask, _, second, gap = constructed
    heads = one_token_heads(model, second, 100 * gap)  # heads that WOULD change everything
    plain, _ = generate(model, ids, mask, greedy(12), eos_token_id=-1, pad_token_id=0)
    wrapped, _ = generate(QGuidedLM(model, heads, beta=0.0), ids, mask, greedy(12), eos_token_id=-1, pad_token_id=0)
    engine = HybridEngine(model, inference_dtype=None, release_after_rollout=False, guidance=QGuidance(heads, 0.0))
    hybrid, _ = engine.generate(ids, mask, greedy(12), eos_token_id=-1, pad_token_id=0)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert plain.tolist() == wrapped.tolist() == hybrid.tolist() == hf[:, ids.shape[1]:].tolist()


def test_beta_shifts_toward_the_high_q_token(constructed) -> None:
    model, ids, mask, top, second, gap = constructed
    # Q(runner-up) = 2 * gap: beta = 1 adds 2 gap to its logit (it overtakes the top token by one gap);
    # beta = 0.25 adds only gap / 2 (the top token stays ahead). V = 5 shifts every logit alike.
    heads = one_token_heads(model, second, 2 * gap)
    engine = HybridEngine(model, inference_dtype=None, release_after_rollout=False, guidance=QGuidance(heads, 1.0))
    strong, _ = engine.generate(ids, mask, greedy(4), eos_token_id=-1, pad_token_id=0)
    engine.guidance = QGuidance(heads, 0.25)
    weak, _ = engine.generate(ids, mask, greedy(4), eos_token_id=-1, pad_token_id=0)
    assert strong[0, 0].item() == second and weak[0, 0].item() == top


def test_chat_decoding_is_q_guided(constructed, tiny_model_dir: str) -> None:
    model, ids, _, top, second, gap = constructed
    tok = load_tokenizer(tiny_model_dir)
    settings = SamplingSettings(max_new_tokens=1, temperature=0)
    for beta, want in ((0.0, top), (1.0, second)):
        guidance = QGuidance(one_token_heads(model, second, 2 * gap), beta)
        chat = ChatModel.from_model(model, tok, guidance=guidance)
        decoding = chat.start(ids[0].tolist(), settings)
        decoding.run()
        assert decoding.completion_ids == [want] or (want in chat.eos_ids and decoding.finish_reason == "stop")


def test_ilql_beta_needs_heads(tiny_model_dir: str) -> None:
    with pytest.raises(ChatrlError, match="has no ILQL heads"):
        ChatModel(tiny_model_dir, dtype="fp32", ilql_beta=2.0)
    assert ChatModel(tiny_model_dir, dtype="fp32", ilql_beta=0.0).guidance is None


# ----------------------------------------------------------------------------- the step through the CLI


def ilql_args(out: Path, data: Path) -> list[str]:
    return ["ilql", "--config", TINY, f"output_dir={out}", f"data.paths=[{data}]", "data.split=0,0,1"]


@pytest.fixture(scope="module")
def ilql_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ilql")
    data = write_fruit_data(tmp / "fruit.jsonl")
    out = tmp / "run"
    proc = run_cli(*ilql_args(out, data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def marker_rate(model_dir: Path, beta: float, n: int = 16) -> float:
    """Share of greedy replies to held-out prompts that contain the marker (the offline reward), Hybrid Engine."""
    tok = load_tokenizer(str(model_dir))
    lm = load_frozen_causal_lm(str(model_dir), "fp32", tokenizer=tok)
    heads, _ = load_heads(model_dir)
    prompt_ids, prompt_mask = pad_rows([encode_prompt(tok, fruit_prompt(1000 + i), 96) for i in range(n)],
                                       tok.pad_token_id, side="left")
    engine = HybridEngine(lm, inference_dtype=None, guidance=QGuidance(heads, beta))
    ids, mask = engine.generate(prompt_ids, prompt_mask, greedy(8), eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, mask, strict=True)]
    return sum(MARKER in t for t in texts) / n


def test_q_guided_decoding_raises_the_offline_reward(ilql_run: Path) -> None:
    model_dir = ilql_run / "model"
    plain, guided = marker_rate(model_dir, 0.0), marker_rate(model_dir, json.loads(
        (model_dir / META_FILE).read_text())["beta"])
    assert guided >= plain + 0.5, (plain, guided)


def test_saved_model_loads_with_plain_transformers_and_heads_beside_it(ilql_run: Path) -> None:
    model_dir = ilql_run / "model"
    assert "OK True" in load_with_plain_transformers(model_dir)
    heads, meta = load_heads(model_dir)
    assert meta.beta == 4.0 and heads.vocab_size == meta.vocab_size
    from safetensors.torch import load_file

    assert not any("q1" in k or k.startswith("heads.") for k in load_file(str(model_dir / "model.safetensors")))


def test_chat_cli_uses_the_saved_heads(ilql_run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "chatrl", "chat", "--model", str(ilql_run / "model"),
                           "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8"],
                          input=fruit_prompt(1003)[0]["content"] + "\n", capture_output=True, text=True, timeout=300,
                          env={**cli_env(), "PYTHONUNBUFFERED": "1"}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Q-guided decoding with beta=4" in proc.stderr and MARKER in proc.stdout


@pytest.mark.slow
def test_killed_and_resumed_run_restores_the_heads(tmp_path: Path, ilql_run: Path) -> None:
    out = tmp_path / "resumed"
    args = ilql_args(out, ilql_run.parent / "fruit.jsonl")  # the same file: the split is seeded by its path
    kill_after_checkpoint(out, 75, args, jitter=2.0, seed=7)  # anywhere in steps 76-150
    proc = run_cli(*args)
    assert proc.returncode == 0 and "resumed from" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert same_weights(ilql_run / "model", out / "model") == []  # the LM, bit for bit (fp32)
    full = load_file(str(ilql_run / "model" / "ilql_heads.safetensors"))
    resumed = load_file(str(out / "model" / "ilql_heads.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_ilql_help_lists_the_options() -> None:
    proc = run_cli("ilql", "--help")
    assert proc.returncode == 0
    for key in ("ilql.tau", "ilql.gamma", "ilql.cql_alpha", "ilql.awac_weight", "ilql.polyak_alpha", "ilql.beta",
                "ilql.two_q"):
        assert key in proc.stdout


def test_serve_and_chat_take_ilql_beta(ilql_run: Path) -> None:
    import argparse

    from chatrl.serve.commands import _load_chat_model, _served_models, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(ilql_run / "model"), "--dtype", "fp32", "--ilql-beta", "2"])
    [(path, _)] = _served_models(args)  # serve's --model may repeat (--arena): one model here
    assert _load_chat_model(args, path).guidance.beta == 2.0  # what `chatrl serve` hands to create_app(chat=...)
    args = parser.parse_args(["chat", "--model", str(ilql_run / "model"), "--ilql-beta", "0"])
    assert _load_chat_model(args).guidance is None  # beta 0: the plain LM, no wrapper


@pytest.mark.parametrize(("override", "field"), [("ilql.tau=1.5", "ilql.tau"), ("ilql.polyak_alpha=0", "polyak"),
                                                 ("ilql.beta=nan", "ilql.beta"),
                                                 ("deepspeed.zero_stage=3", "zero_stage")])
def test_bad_ilql_config_fails_before_work(override: str, field: str) -> None:
    with pytest.raises(ChatrlError, match=field):
        load_config(ILQLConfig, TINY, [override])  # load_config runs check()
