"""evaluate_models end-to-end on the tiny model (policy, reference and reward model), and the CLI commands."""

from __future__ import annotations

import json
import re

import pytest
import torch

from chatrl.cli import main
from chatrl.data.types import Prompt
from chatrl.eval import responses as R
from chatrl.eval.evaluate import evaluate_models, model_metrics
from chatrl.eval.results import load_result, save_result

PROMPTS = [
    Prompt([{"role": "user", "content": "What is the capital of France?"}], reference="Paris is the capital."),
    Prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a short joke about cats, please."}], reference="Cats nap a lot."),
    Prompt([{"role": "user", "content": "Count to three."}], reference="One, two, three."),
]


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny reward model: the tiny LM's body with a fresh one-label score head; pad = <|endoftext|> (id 0)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = 0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def other_policy_dir(tmp_path_factory) -> str:
    """A second tiny model with different random weights (so its KL to the first is not zero)."""
    from chatrl.models.builtin import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-seed1")
    build_tiny_model(out, seed=1)
    return str(out)


def _single_logp(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Reference computation without batching or padding: log p(response token | prefix) for one sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return torch.stack([logp[len(prompt_ids) + i - 1, t] for i, t in enumerate(response_ids)])


def _single_kl(model, ref, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Exact KL summed over the response positions, one unpadded sequence at a time."""
    ids = torch.tensor([prompt_ids + response_ids])
    sl = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(response_ids))
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids).logits[0, sl].float(), -1)
        q = torch.log_softmax(ref(input_ids=ids).logits[0, sl].float(), -1)
    return (p.exp() * (p - q)).sum().item()


def test_evaluate_models_end_to_end(tiny_model_dir, tiny_rm_dir, other_policy_dir, tmp_path):
    models = {"sft": tiny_model_dir, "copy": tiny_model_dir, "other": other_policy_dir}
    result = evaluate_models(models, PROMPTS, reward_model=tiny_rm_dir, reference_model=tiny_model_dir,
                             max_new_tokens=6, batch_size=2)
    m = result.metrics
    assert list(m) == ["sft", "copy", "other"] and result.baseline == "sft"
    # the reference itself: KL exactly 0; an identical model's greedy replies tie with the baseline -> 0.5
    assert m["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert m["copy"]["win_rate"] == pytest.approx(0.5) and m["sft"]["win_rate"] is None
    assert [s["responses"]["sft"] for s in result.samples] == [s["responses"]["copy"] for s in result.samples]
    # tiny random models rarely emit EOS: length is the cap unless EOS came first
    assert 0 < m["other"]["length_mean"] <= 6 and 0.0 <= m["other"]["eos_rate"] <= 1.0
    for name in models:
        assert m[name]["bleu"] is not None and 0.0 <= m[name]["rouge1"] <= 1.0
        assert 0.0 <= m[name]["distinct_1"] <= 1.0
        rewards = [s["rewards"][name] for s in result.samples]
        assert m[name]["reward_mean"] == pytest.approx(sum(rewards) / 3)

    # rewards from padded batches equal unpadded single-sequence scores (HF's own pooling), read at the
    # reply's end-of-turn token
    rm, rm_tok = R.load_reward(tiny_rm_dir)
    for s in result.samples:
        ids = torch.tensor([R.reward_ids(rm_tok, s["prompt"], s["responses"]["other"], 2048)])
        assert ids[0, -1].item() == rm_tok.eos_token_id
        with torch.no_grad():
            single = rm(input_ids=ids).logits[0, 0].item()
        assert s["rewards"]["other"] == pytest.approx(single, abs=1e-4)

    # KL of "other" equals the exact KL of the next-token distributions, recomputed sequence by sequence
    pol, tok = R.load_policy(other_policy_dir)
    ref, _ = R.load_policy(tiny_model_dir)
    gen = R.generate(pol, tok, [p.messages for p in PROMPTS], max_new_tokens=6, batch_size=2)
    assert gen.texts == [s["responses"]["other"] for s in result.samples]
    expected = [_single_kl(pol, ref, p, r) for p, r in zip(gen.prompt_ids, gen.response_ids, strict=True)]
    assert [s["kl"]["other"] for s in result.samples] == pytest.approx(expected, abs=1e-4)
    assert m["other"]["kl"] == pytest.approx(sum(expected) / 3, abs=1e-4)
    assert m["other"]["kl"] > 1e-3 and all(k >= 0 for k in expected)

    json_path, md_path = save_result(result, tmp_path / "eval")
    again = load_result(json_path)
    assert again.metrics["other"]["kl"] == pytest.approx(m["other"]["kl"])
    assert again.samples[1]["prompt"][-1]["content"].startswith("Tell me a short joke")
    md = md_path.read_text()
    assert "| model |" in md and "| other |" in md and "KL to ref" in md


def test_sampling_and_no_optional_models(tiny_model_dir):
    prompts = [Prompt([{"role": "user", "content": "Say something."}])] * 2
    result = evaluate_models({"a": tiny_model_dir}, prompts, max_new_tokens=5, greedy=False, seed=3)
    m = result.metrics["a"]
    assert m["reward_mean"] is None and m["kl"] is None and m["bleu"] is None and m["win_rate"] is None
    assert result.settings["greedy"] is False and m["length_mean"] > 0
    again = evaluate_models({"a": tiny_model_dir}, prompts, max_new_tokens=5, greedy=False, seed=3)
    assert [s["responses"] for s in again.samples] == [s["responses"] for s in result.samples]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_eval_compare_score(tiny_model_dir, tiny_rm_dir, tmp_path, capsys):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p.messages, "reference": p.reference} for p in PROMPTS])
    out = tmp_path / "run" / "eval"
    assert main(["eval", "--model", f"sft={tiny_model_dir}", "--model", f"ppo={tiny_model_dir}",
                 "--prompts", prompts, "--reward-model", tiny_rm_dir, "--reference", tiny_model_dir,
                 "--judge", tiny_rm_dir, "--max-new-tokens", "4", "--limit", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["settings"]["num_prompts"] == 2 and set(saved["metrics"]) == {"sft", "ppo"}
    assert saved["settings"]["judge_model"] == tiny_rm_dir  # the same folder as judge: its scores are the RM's
    assert [s["judge"]["ppo"] for s in saved["samples"]] == [s["rewards"]["ppo"] for s in saved["samples"]]
    printed = capsys.readouterr().out
    assert "Evaluation on 2 prompts" in printed and "eval.md" in printed
    assert "KL to ref" in printed and "win rate vs baseline" in printed

    assert main(["compare", "--baseline", tiny_model_dir, "--model", tiny_model_dir, "--prompts", prompts,
                 "--max-new-tokens", "3", "--plain"]) == 0
    text = capsys.readouterr().out
    assert "Prompt 3" in text and "greedy" in text and "capital of France" in text

    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: Hello, how can I help?",
         "rejected": "\n\nHuman: hi\n\nAssistant: Go away."},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    scored = tmp_path / "scores.jsonl"
    assert main(["score", "--model", tiny_rm_dir, "--data", pairs, "--output", str(scored)]) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["margin"] == pytest.approx(rows[0]["chosen_score"] - rows[0]["rejected_score"])
    accuracy = sum(r["correct"] for r in rows) / 2
    printed = capsys.readouterr()
    assert f"pair accuracy (chosen scored above rejected): {accuracy:.1%}" in printed.out
    # a progress bar over the 4 replies of the 2 pairs, with its rate: "scoring: 100%|###| 4/4 [00:00<00:00, 9.1reply/s]"
    assert re.search(r"scoring: 100%.* 4/4 \[[0-9:<]+, *[0-9.]+reply/s\]", printed.err), printed.err
    # the same reply scored as a single prompt + response row gets the same score as inside the pair
    singles = _jsonl(tmp_path / "singles.jsonl", [{"prompt": "2+2?", "response": "4"}])
    assert main(["score", "--model", tiny_rm_dir, "--data", singles, "--output", str(scored)]) == 0
    (single,) = [json.loads(line) for line in scored.read_text().splitlines()]
    assert single["score"] == pytest.approx(rows[1]["chosen_score"], abs=1e-5) and "correct" not in single
    assert "pair accuracy" not in capsys.readouterr().out

    assert main(["eval", "--model", "nonsense", "--prompts", prompts]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_reward_gain_and_win_rate_are_this_model_against_the_baseline():
    gen = R.Generation([[1]] * 3, [[2, 3]] * 3, ["a b", "a c", "b c"], [False] * 3)
    # rewards 1, 2, 3 against the baseline's 0, 2, 5: gain -1/3 (s.e. sqrt(7) / 3), one win, one tie, one loss
    got = model_metrics(gen, [None] * 3, [1.0, 2.0, 3.0], [0.0, 2.0, 5.0], None)
    assert got["reward_gain"] == pytest.approx(-1 / 3) and got["reward_gain_se"] == pytest.approx(7 ** 0.5 / 3)
    assert got["win_rate"] == pytest.approx(0.5) and (got["reward_wins"], got["reward_losses"]) == (1, 1)
    better = model_metrics(gen, [None] * 3, [1.0, 3.0, 6.0], [0.0, 2.0, 5.0], None)
    assert better["reward_gain"] == pytest.approx(1.0) and better["win_rate"] == 1.0


def test_reward_scores_reports_progress_per_batch(tiny_rm_dir):
    rm, tok = R.load_reward(tiny_rm_dir)
    prompts = [[{"role": "user", "content": f"{i} + 1?"}] for i in range(5)]
    done: list[int] = []
    scores = R.reward_scores(rm, tok, prompts, ["1", "2", "3", "4", "5"], batch_size=2, advance=done.append)
    assert len(scores) == 5 and sorted(done) == [1, 2, 2]  # batches of 2, 2 and 1 replies, each reported once


def test_judge_scores_beside_the_reward_model(tiny_model_dir, tiny_rm_dir, other_policy_dir, tmp_path):
    """eval's judge: a second reward model scores the same replies; its gain is this model minus the baseline per
    prompt, computed from the judge's own scores (not the reward model's)."""
    from transformers import AutoModelForSequenceClassification

    judge_dir = tmp_path / "judge"
    torch.manual_seed(1)  # another score head: the judge disagrees with the reward model
    judge = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    judge.config.pad_token_id = 0
    judge.save_pretrained(judge_dir)
    R.load_tokenizer(tiny_model_dir).save_pretrained(judge_dir)
    models = {"sft": tiny_model_dir, "other": other_policy_dir}
    result = evaluate_models(models, PROMPTS, reward_model=tiny_rm_dir, judge_model=str(judge_dir),
                             max_new_tokens=6, batch_size=2)
    jm, jt = R.load_reward(str(judge_dir))
    texts = {n: [s["responses"][n] for s in result.samples] for n in models}
    expected = {n: R.reward_scores(jm, jt, [p.messages for p in PROMPTS], texts[n]) for n in models}
    for n in models:
        assert [s["judge"][n] for s in result.samples] == pytest.approx(expected[n], abs=1e-5)
        assert [s["judge"][n] for s in result.samples] != pytest.approx([s["rewards"][n] for s in result.samples])
    diffs = [a - b for a, b in zip(expected["other"], expected["sft"], strict=True)]
    assert result.metrics["other"]["judge_gain"] == pytest.approx(sum(diffs) / 3, abs=1e-5)
    mean = sum(diffs) / 3
    se = (sum((d - mean) ** 2 for d in diffs) / 2 / 3) ** 0.5
    assert result.metrics["other"]["judge_gain_se"] == pytest.approx(se, abs=1e-5)
    assert result.metrics["sft"]["judge_gain"] is None and result.settings["judge_model"] == str(judge_dir)
