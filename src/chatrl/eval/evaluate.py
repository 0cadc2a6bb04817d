"""`evaluate_models`: generate with each model on the same prompts, then score and compare the responses.

Models are loaded one at a time (only the reference stays loaded while policies take turns), so evaluating
several checkpoints costs the memory of about two models. The reward model is loaded last and scores all.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from chatrl.data.types import Message, Prompt
from chatrl.errors import ChatrlError
from chatrl.eval import metrics as M
from chatrl.eval import responses as R
from chatrl.eval.results import EvalResult


def _as_prompt(p: Prompt | str | Sequence[Message]) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(messages=[{"role": "user", "content": p}])
    return Prompt(messages=list(p))


def evaluate_models(models: dict[str, str], prompts: Sequence[Prompt | str | Sequence[Message]], *,
                    reward_model: str | None = None, judge_model: str | None = None,
                    reference_model: str | None = None,
                    max_new_tokens: int = 128, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                    batch_size: int = 8, seed: int = 0, dtype: str = "fp32", max_prompt_tokens: int | None = None,
                    log: Callable[[str], None] | None = None) -> EvalResult:
    """Generate a response per prompt with every model and compute the metrics of `results.METRICS`.

    models: name -> model path or alias, in order; the first is the baseline for win rates.
    prompts: `Prompt` records (or plain strings / message lists); a `reference` enables BLEU/ROUGE.
    reward_model: a one-label sequence classifier folder (reward / win rate); judge_model: a second one, trained on
    other pairs than the policy's reward model (judge_* metrics: the proxy's gain beside an independent one, so
    reward over-optimisation shows); reference_model: the model to
    measure KL against (usually the SFT model; it must share the policies' tokenizer).
    """
    if not models:
        raise ChatrlError("evaluate_models needs at least one model (--model NAME=PATH)")
    if not prompts:
        raise ChatrlError("evaluate_models needs at least one prompt")
    log = log or (lambda _msg: None)
    recs = [_as_prompt(p) for p in prompts]
    msgs = [r.messages for r in recs]
    gens: dict[str, R.Generation] = {}
    kls: dict[str, list[float]] = {}
    ref = None
    for name, path in models.items():
        log(f"generating with {name} ({path}) on {len(recs)} prompts")
        model, tok = R.load_policy(path, dtype=dtype)
        gens[name] = gen = R.generate(model, tok, msgs, max_new_tokens=max_new_tokens, greedy=greedy,
                                      max_prompt_tokens=max_prompt_tokens,
                                      temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)
        if reference_model:
            if ref is None:
                log(f"loading reference model {reference_model}")
                ref = R.load_policy(reference_model, dtype=dtype)
            kls[name] = _kl(model, tok, ref, gen, batch_size, name)
        del model
        gc.collect()
    del ref
    rewards = _scores(reward_model, "reward model", gens, msgs, dtype, batch_size, log)
    judged = _scores(judge_model, "judge", gens, msgs, dtype, batch_size, log)
    settings = {"num_prompts": len(recs), "max_new_tokens": max_new_tokens, "greedy": greedy,
                "reward_model": reward_model, "judge_model": judge_model, "reference_model": reference_model,
                "seed": seed}
    if not greedy:
        settings.update(temperature=temperature, top_p=top_p)
    result = EvalResult(models=dict(models), settings=settings)
    baseline = next(iter(models))
    for name, gen in gens.items():
        result.metrics[name] = model_metrics(gen, [r.reference for r in recs], rewards.get(name),
                                             rewards.get(baseline) if name != baseline else None, kls.get(name))
        result.metrics[name].update(judge_metrics(judged.get(name), judged.get(baseline) if name != baseline
                                                  else None))
    result.samples = [
        {"prompt": r.messages, "reference": r.reference,
         "responses": {n: g.texts[i] for n, g in gens.items()},
         "rewards": {n: s[i] for n, s in rewards.items()},
         "judge": {n: s[i] for n, s in judged.items()},
         "kl": {n: k[i] for n, k in kls.items()}}
        for i, r in enumerate(recs)]
    return result


def _scores(path: str | None, what: str, gens: dict[str, R.Generation], msgs: list, dtype: str, batch_size: int,
            log: Callable[[str], None]) -> dict[str, list[float]]:
    """Every model's responses scored by one reward model (loaded once); {} without one."""
    if not path:
        return {}
    log(f"scoring responses with {what} {path}")
    rm, rm_tok = R.load_reward(path, dtype=dtype)
    return {name: R.reward_scores(rm, rm_tok, msgs, gen.texts, batch_size=batch_size) for name, gen in gens.items()}


def judge_metrics(scores: Sequence[float] | None, baseline: Sequence[float] | None) -> dict[str, float | None]:
    """judge_mean, and judge_gain with its s.e. against the baseline's judge scores (None where not judged)."""
    out: dict[str, float | None] = dict.fromkeys(["judge_mean", "judge_gain", "judge_gain_se"])
    if scores is not None:
        out["judge_mean"] = M.score_stats(scores)["mean"]
        if baseline is not None:
            gain = M.paired_difference(scores, baseline)
            out.update(judge_gain=gain.mean, judge_gain_se=gain.se)
    return out


def _kl(model, tok, ref: tuple, gen: R.Generation, batch_size: int, name: str) -> list[float]:
    """Per-response exact KL(model || ref): the full next-token distributions compared at every response position
    (non-negative, unlike a log-ratio of the greedy tokens)."""
    ref_model, ref_tok = ref
    if ref_tok.get_vocab() != tok.get_vocab():
        raise ChatrlError(f"model {name!r} and the reference model use different tokenizers, so token-level KL "
                          "is undefined; pass the SFT model this policy was trained from as --reference")
    return R.response_kl(model, ref_model, gen.prompt_ids, gen.response_ids, tok.pad_token_id, batch_size)


def model_metrics(gen: R.Generation, references: Sequence[str | None], rewards: Sequence[float] | None,
                  baseline_rewards: Sequence[float] | None, kl: Sequence[float] | None) -> dict[str, float | None]:
    """All metrics for one model's responses; metrics whose inputs are missing are None."""
    out: dict[str, float | None] = dict.fromkeys(
        ["reward_mean", "reward_std", "win_rate", "reward_gain", "reward_gain_se", "reward_wins", "reward_losses", "kl",
         "bleu", "rouge1", "rouge2", "rougeL"])
    if rewards is not None:
        stats = M.score_stats(rewards)
        out.update(reward_mean=stats["mean"], reward_std=stats["std"])
        if baseline_rewards is not None:
            gain = M.paired_difference(rewards, baseline_rewards)  # this model minus the baseline
            out.update(win_rate=gain.win_rate, reward_gain=gain.mean, reward_gain_se=gain.se, reward_wins=gain.wins,
                       reward_losses=gain.losses)
    if kl is not None:
        out["kl"] = float(torch.tensor(kl).mean())
    out.update(M.length_stats(gen.lengths, gen.ended_with_eos))
    words = [t.split() for t in gen.texts]
    out["distinct_1"], out["distinct_2"] = M.distinct_n(words, 1), M.distinct_n(words, 2)
    pairs = [(h, r) for h, r in zip(gen.texts, references, strict=True) if r]
    if pairs:
        hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
        out["bleu"] = M.bleu(hyps, refs)
        out.update(M.rouge(hyps, refs))
    return out
