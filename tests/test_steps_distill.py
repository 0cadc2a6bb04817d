"""`chatrl distill` (and `grpo.teacher`) through the real CLI: a student equal to its teacher gets exactly zero
advantages and keeps its weights, a teacher with another tokenizer is refused with one line, a distilled student
moves toward its teacher on held-out prompts, and a killed run resumes to the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrl.config import PipelineConfig
from chatrl.config_rl import DistillConfig, GRPOConfig
from chatrl.configbase import load_config
from chatrl.errors import ChatrlError
from chatrl.eval.evaluate import evaluate_models
from chatrl.eval.metrics import paired_difference
from chatrl.models.loading import check_same_tokenizer
from chatrl.steps.pipeline import build_plan, default_steps, preflight
from helpers import kill_after_checkpoint, read_metrics, run_cli, same_weights


def distill_args(student: str | Path, teacher: str | Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--config", "configs/tiny-distill.yaml", f"output_dir={out}", f"actor.name_or_path={student}",
            f"grpo.teacher={teacher}", *extra]


def test_a_student_equal_to_its_teacher_gets_zero_advantages_and_keeps_its_weights(tiny_model_dir: str,
                                                                                   tmp_path: Path) -> None:
    """Teacher = the student's own folder, multi-turn episodes (guess_number answers each wrong guess): in fp32 the
    teacher's log-probs equal the student's bit for bit, so every advantage is exactly 0, the policy gradient is 0
    and (no KL, no entropy bonus, no weight decay) two optimizer steps per iteration leave the weights as they were."""
    out = tmp_path / "same"
    proc = run_cli(*distill_args(tiny_model_dir, tiny_model_dir, out, "env.name=guess_number", "env.max_turns=3",
                                 "grpo.iterations=2", "actor_optim.weight_decay=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["turns"] > 1 for r in rows)  # environment tokens inside the responses
    for r in rows:
        assert r["distill/reverse_kl"] == 0 and r["advantage_mean"] == 0 and r["advantage_std"] == 0, r
        assert r["policy_grad_norm"] == 0 and r["distill/teacher_logprob"] < 0, r
        assert "zero_variance_groups" not in r  # groups of one sample: no all_tied alarm
    assert "ALARM" not in proc.stderr
    assert same_weights(Path(tiny_model_dir), out / "actor") == []


def test_grpo_with_a_teacher_mixes_the_environment_advantage_by_teacher_weight(word_sft: Path, tmp_path: Path) -> None:
    """`chatrl grpo` with grpo.teacher = the actor's own folder and teacher_weight 0.25: the distillation term is
    exactly 0, so the first iteration (same weights, same seed, same rollout as plain GRPO) has advantages of exactly
    0.75 x plain GRPO's; the reference is not loaded (kl_coef 0) and the distill metrics are logged."""
    common = ["grpo", "--config", "configs/tiny-grpo.yaml", f"actor.name_or_path={word_sft}", "grpo.iterations=1",
              "env.name=arithmetic", "reward.functions=[reward_fns:banana_share]", "checkpoint.every=0"]
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    proc = run_cli(*common, f"output_dir={plain}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*common, f"output_dir={mixed}", f"grpo.teacher={word_sft}", "grpo.teacher_weight=0.25",
                   "teacher.dtype=fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (p,), (m,) = read_metrics(plain), read_metrics(mixed)
    assert p["reward_mean"] == m["reward_mean"] and p["advantage_std"] > 0  # the same rollout, varied rewards
    assert m["advantage_std"] == pytest.approx(0.75 * p["advantage_std"], rel=1e-6)
    assert m["advantage_mean"] == pytest.approx(0.75 * p["advantage_mean"], abs=1e-7)
    assert m["distill/reverse_kl"] == 0 and "distill/reverse_kl" not in p and m["kl"] == 0


def test_a_teacher_with_another_tokenizer_is_refused_with_one_line(tiny_model_dir: str, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(teacher)
    proc = run_cli(*distill_args(tiny_model_dir, teacher, tmp_path / "out", "grpo.iterations=1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert f"grpo.teacher={teacher}" in line and "tokenizer" in line and "49153" in line, line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


class FakeTokenizer:
    """What check_same_tokenizer reads of a tokenizer."""

    def __init__(self, vocab: dict[str, int], eos: int = 0) -> None:
        self.vocab, self.eos_token_id, self.bos_token_id, self.pad_token_id = vocab, eos, None, 1

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_a_tokenizer_of_the_same_size_with_other_ids_is_refused() -> None:
    student = FakeTokenizer({"<eos>": 0, "<pad>": 1, "a": 2, "b": 3})
    check_same_tokenizer(student, FakeTokenizer({"<eos>": 0, "<pad>": 1, "a": 2, "b": 3}), "grpo.teacher", "t")
    with pytest.raises(ChatrlError, match=r"grpo.teacher=t: .* differs .* in 2 token ids \(e.g. 'a'\)"):
        check_same_tokenizer(student, FakeTokenizer({"<eos>": 0, "<pad>": 1, "a": 3, "b": 2}), "grpo.teacher", "t")
    with pytest.raises(ChatrlError, match="eos_token_id"):
        check_same_tokenizer(student, FakeTokenizer({"<eos>": 0, "<pad>": 1, "a": 2, "b": 3}, eos=3),
                             "grpo.teacher", "t")


def test_distill_needs_a_teacher() -> None:
    proc = run_cli("distill", "--config", "configs/tiny-distill.yaml")
    assert proc.returncode == 2 and "chatrl distill needs a teacher: set grpo.teacher" in proc.stderr


def test_distill_config_checks() -> None:
    """Pure distillation needs no group and no reward; mixed with the environment's advantage it needs both."""
    cfg = load_config(DistillConfig, extra={"grpo": {"teacher": "tiny-random"}})  # chat env, no reward: fine
    assert cfg.rollout.samples_per_prompt == 1 and cfg.grpo.kl_coef == 0 and not cfg.needs_reference()
    with pytest.raises(ChatrlError, match="advantage=grpo needs rollout.samples_per_prompt >= 2"):
        load_config(DistillConfig, extra={"grpo": {"teacher": "tiny-random", "teacher_weight": 0.5},
                                          "env": {"name": "arithmetic"}})
    with pytest.raises(ChatrlError, match="env.name=chat gives no reward"):
        load_config(GRPOConfig, extra={"grpo": {"teacher": "tiny-random", "teacher_weight": 0.5}})
    with pytest.raises(ChatrlError, match=r"grpo.teacher_weight=1.5 must be in \[0, 1\]"):
        load_config(GRPOConfig, extra={"grpo": {"teacher": "tiny-random", "teacher_weight": 1.5},
                                       "env": {"name": "arithmetic"}})


def test_the_pipeline_distils_in_an_environment_from_the_base_model(tmp_path: Path) -> None:
    """algorithm=distill in an environment: step 3 alone, on the base model, the teacher from the section; on chat
    prompts: SFT then distillation, no reward model."""
    cfg = load_config(PipelineConfig, path="configs/tiny-pipeline.yaml", overrides=[
        f"run_dir={tmp_path}", "algorithm=distill", "distill.env.name=arithmetic", "distill.grpo.teacher=/t"])
    plan = build_plan(cfg)
    assert isinstance(plan.rl, DistillConfig) and plan.rl.grpo.teacher == "/t"
    assert default_steps(plan) == [3] and plan.rl.actor.name_or_path == "tiny-random"
    assert plan.outputs()[3] == tmp_path / "distill" / "actor"
    with pytest.raises(ChatrlError, match="distill.grpo.teacher=/t: no such model folder"):
        preflight(cfg, plan, [3])  # in seconds, before any model loads
    cfg = load_config(PipelineConfig, path="configs/tiny-pipeline.yaml", overrides=[
        f"run_dir={tmp_path}", "algorithm=distill", "distill.grpo.teacher=/t"])
    plan = build_plan(cfg)
    assert default_steps(plan) == [1, 3] and plan.rl.reward.model is None
    assert plan.rl.actor.name_or_path == str(tmp_path / "sft" / "model")


@pytest.fixture(scope="module")
def student(word_sft: Path, tmp_path_factory) -> Path:
    """The word-SFT model with every weight matrix perturbed by seeded Gaussian noise of its own s.d.: a student
    that speaks roughly the teacher's language, ~2 nats of reverse KL per reply away from it."""
    out = tmp_path_factory.mktemp("student") / "model"
    model = AutoModelForCausalLM.from_pretrained(word_sft)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:  # the matrices; the norms' gains stay as they are
                param.add_(torch.randn(param.shape, generator=noise) * param.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(word_sft).save_pretrained(out)
    return out


def test_distillation_moves_the_student_toward_the_teacher(word_sft: Path, student: Path, tmp_path: Path) -> None:
    """The perturbed student distils the word-SFT model (teacher) for 8 iterations. Measured on 48 held-out prompts
    (tasks the run never played), the exact reverse KL(student || teacher) summed over each sampled reply (full
    next-token distributions) falls by more than 3 s.e. of the paired difference (measured: by 1.83 nats, s.e. 0.21;
    46 of 48 prompts closer)."""
    out = tmp_path / "distill"
    proc = run_cli(*distill_args(student, word_sft, out, "grpo.iterations=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in read_metrics(out):  # the logged estimate: the mean over the actions of log p_student - log p_teacher
        assert r["distill/reverse_kl"] == pytest.approx(r["distill/student_logprob"] - r["distill/teacher_logprob"],
                                                        abs=1e-5), r
    prompts = [f"Say a few words. ({task})" for task in range(10_000, 10_048)]
    result = evaluate_models({"before": str(student), "after": str(out / "actor")}, prompts,
                             reference_model=str(word_sft), greedy=False, max_new_tokens=16, batch_size=16, seed=3)
    before = [s["kl"]["before"] for s in result.samples]
    after = [s["kl"]["after"] for s in result.samples]
    change = paired_difference(after, before)  # new minus baseline: negative = closer to the teacher
    assert change.mean < -3 * change.se and change.mean < -0.5, (change, result.metrics)


@pytest.mark.slow
def test_distill_killed_and_resumed_ends_with_the_same_weights(word_sft: Path, student: Path, tmp_path: Path) -> None:
    common = ["grpo.iterations=6", "checkpoint.every=2"]
    straight = tmp_path / "straight"
    proc = run_cli(*distill_args(student, word_sft, straight, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    kill_after_checkpoint(resumed, 2, distill_args(student, word_sft, resumed, *common), jitter=1.0, seed=5)
    assert not (resumed / "actor").exists()
    proc = run_cli(*distill_args(student, word_sft, resumed, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert same_weights(straight / "actor", resumed / "actor") == []
    assert same_weights(straight / "actor", student) != []  # the run did train
