"""The typed config machinery: YAML + dotted overrides, type errors that name the key, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatrl.algorithms.advantages import ADVANTAGE_ESTIMATORS
from chatrl.algorithms.kl import KL_ESTIMATORS
from chatrl.algorithms.losses import LOSS_AGGREGATIONS
from chatrl.config import PipelineConfig, RewardConfig, SFTConfig
from chatrl.config_rl import BatchPlan, GRPOConfig, PPOConfig
from chatrl.configbase import help_lines, load_config
from chatrl.engine.deepspeed import build_ds_config, lr_lambda
from chatrl.errors import ChatrlError


def test_yaml_then_overrides_with_types(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n  betas: [0.8, 0.9]\nmodel:\n  lora: {r: 8}\n")
    cfg = load_config(SFTConfig, path, ["optim.lr=2e-4", "data.paths=a.jsonl,b.jsonl", "sft.packing=true",
                                        "data.max_rows=none", "model.lora.target_modules=[q_proj]"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == [0.8, 0.9] and cfg.model.lora.r == 8
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"] and cfg.sft.packing is True and cfg.data.max_rows is None
    assert cfg.model.lora.target_modules == ["q_proj"]
    assert SFTConfig().optim.betas is not cfg.optim.betas  # list defaults are per instance


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("optim.lr=fast", "'optim.lr': got 'fast', expected a number"),
    ("optim.micro_batch_size=2.5", "expected an integer"),
    ("model.dtype=fp16", "expected one of ['auto', 'bf16', 'fp32']"),
    ("sft.packing=maybe", "expected true or false"),
    ("optim=3", "is a section"),
    ("deepspeed.offload_params=true", "needs deepspeed.zero_stage=3"),
    ("deepspeed.zero_stage=4", "must be 0, 1, 2 or 3"),
    ("noequals", "section.field=value"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ChatrlError) as err:
        load_config(SFTConfig, None, [override])
    assert message in str(err.value)


def test_missing_or_broken_yaml(tmp_path: Path) -> None:
    with pytest.raises(ChatrlError, match="not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ChatrlError, match="not valid YAML"):
        load_config(SFTConfig, bad)


def test_help_lists_every_field_once_with_defaults() -> None:
    lines = "\n".join(help_lines(RewardConfig))
    assert "rm_loss.center_coef (float, default 0.0)" in lines and "optim.lr (float, default 1e-05)" in lines
    assert lines.count("  output_dir (") == 1
    ppo = "\n".join(help_lines(PPOConfig))
    assert "critic.name_or_path (str, default '')" in ppo  # PPO's critic default differs from ModelConfig's


def test_ppo_batch_plan_arithmetic_and_errors() -> None:
    cfg = load_config(PPOConfig, None, ["reward.functions=[m:f]", "rollout.prompts_per_rollout=16",
                                        "rollout.samples_per_prompt=2", "ppo.mini_batches=4",
                                        "ppo.micro_batch_size=2"])
    # rollout 32; 2 processes: 16 each; mini-batch 8; grad_accum = 8 / (2 x 2) = 2
    assert cfg.batch_plan(2) == BatchPlan(rollout=32, per_process=16, mini_batch=8, grad_accum=2, world=2)
    with pytest.raises(ChatrlError, match="not divisible by 3 processes"):
        cfg.batch_plan(3)
    with pytest.raises(ChatrlError, match="needs a reward"):
        load_config(PPOConfig, None, [])
    with pytest.raises(ChatrlError, match="one weight per function"):
        load_config(PPOConfig, None, ["reward.functions=[a:b]", "reward.function_weights=[1,2]"])


def test_grpo_config_checks() -> None:
    with pytest.raises(ChatrlError, match="gives no reward itself"):
        load_config(GRPOConfig, None, [])  # the chat env with neither reward model nor functions
    with pytest.raises(ChatrlError, match="samples_per_prompt >= 2"):
        load_config(GRPOConfig, None, ["env.name=arithmetic", "rollout.samples_per_prompt=1",
                                       "rollout.prompts_per_rollout=4", "grpo.micro_batch_size=4"])
    with pytest.raises(ChatrlError, match="expected one of"):
        load_config(GRPOConfig, None, ["env.name=arithmetic", "grpo.advantage=gae"])  # GAE needs PPO's critic
    cfg = load_config(GRPOConfig, None, ["env.name=arithmetic", "rollout.samples_per_prompt=4",
                                         "rollout.prompts_per_rollout=4", "grpo.micro_batch_size=4"])
    assert not cfg.needs_reference() and cfg.policy is cfg.grpo  # kl_coef 0: no reference model


def test_pipeline_step_sections_merge_overrides(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("sft:\n  optim: {lr: 1.0e-5, max_steps: 3}\n")
    cfg = load_config(PipelineConfig, path, ["sft.optim.micro_batch_size=2"])
    assert cfg.sft == {"optim": {"lr": 1.0e-5, "max_steps": 3, "micro_batch_size": "2"}}


def test_deepspeed_config_generation(tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, None, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                        "optim.micro_batch_size=2", "optim.grad_accum=4"])
    ds = build_ds_config(cfg.optim, cfg.deepspeed, bf16=True, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["type"] == "AdamW"  # DeepSpeed builds its CPU Adam for offload
    zero0 = build_ds_config(cfg.optim, load_config(SFTConfig).deepspeed, bf16=True, world_size=1)
    assert "bf16" not in zero0 and zero0["torch_autocast"]["dtype"] == "bfloat16"
    raw = tmp_path / "ds.json"
    raw.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}')
    cfg.deepspeed.raw_config = str(raw)
    merged = build_ds_config(cfg.optim, cfg.deepspeed, bf16=True, world_size=2)
    assert merged["zero_optimization"]["stage"] == 2 and merged["gradient_clipping"] == 0.5
    assert merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # kept from the generated config


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = load_config(SFTConfig, None, ["optim.warmup_steps=2", "optim.scheduler=cosine"])
    f = lr_lambda(cfg.optim, total_steps=10)
    # warmup: (s+1)/2 -> 0.5, 1.0; then cosine over the 8 remaining steps: 0.5 * (1 + cos(pi * 4/8)) = 0.5
    assert [f(0), f(1), f(2), f(6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert f(10) == pytest.approx(0.0)
    linear = lr_lambda(load_config(SFTConfig, None, ["optim.scheduler=linear"]).optim, total_steps=4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_policy_choices_are_the_registries_names() -> None:
    """Every registered estimator / aggregation is a valid option (and nothing else is): a new one needs no config
    edit. GRPO takes the critic-free advantages only."""
    base = ["env.name=arithmetic", "rollout.samples_per_prompt=4", "grpo.kl_in=reward"]
    for name, estimator in ADVANTAGE_ESTIMATORS.items():
        if estimator.needs_critic:
            with pytest.raises(ChatrlError):
                load_config(GRPOConfig, None, [*base, f"grpo.advantage={name}"])
        else:
            assert load_config(GRPOConfig, None, [*base, f"grpo.advantage={name}"]).grpo.advantage == name
    for name in KL_ESTIMATORS:
        assert load_config(GRPOConfig, None, [*base, f"grpo.kl_estimator={name}"]).grpo.kl_estimator == name
    for name in ("auto", *LOSS_AGGREGATIONS):
        assert load_config(GRPOConfig, None, [*base, f"grpo.loss_agg={name}"]).grpo.loss_agg == name
    with pytest.raises(ChatrlError):
        load_config(GRPOConfig, None, [*base, "grpo.kl_estimator=k9"])
