"""`chatrl pipeline`: SFT -> reward model -> RL (PPO or GRPO) -> eval -> report (or SFT -> DPO|KTO -> eval -> report),
each step feeding the next, all in one run directory. A step whose finished output exists is skipped (unless forced), so an interrupted
pipeline continues where it stopped; every config is built and checked before anything runs."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from chatrl.config import PipelineConfig, RewardConfig, SFTConfig
from chatrl.config_offline import DPOConfig, ILQLConfig, KTOConfig, RFTConfig
from chatrl.config_rl import DistillConfig, GRPOConfig, PPOConfig
from chatrl.configbase import deep_merge, load_config
from chatrl.data.prepare import load_records
from chatrl.envs.demos import write_demos
from chatrl.errors import ChatrlError
from chatrl.eval.env_eval import evaluate_env, save_env_result
from chatrl.eval.evaluate import evaluate_models
from chatrl.eval.report import write_report
from chatrl.eval.results import rich_table, save_result
from chatrl.models.builtin import ALIASES
from chatrl.steps.registry import STEPS, Step
from chatrl.steps.rft import round_model


@dataclass(frozen=True)
class Algorithm:
    """How the pipeline runs step 3 with one algorithm: the step (`steps.registry`) and what the pipeline adds."""
    step: Step
    model_key: str      # the config section holding the trained policy's ModelConfig
    needs_rm: bool      # scores with step 2's reward model (unless it plays an environment that rewards by itself)
    env_capable: bool   # can play an environment that rewards by itself (then step 3 alone is the default)
    data: str           # the records step 3 trains on: "rlhf" prompts, "reward" pairs or "kto" labelled replies

    @property
    def config(self) -> type:
        return self.step.config


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(STEPS["ppo"], "actor", needs_rm=True, env_capable=False, data="rlhf"),
    "grpo": Algorithm(STEPS["grpo"], "actor", needs_rm=True, env_capable=True, data="rlhf"),
    "rft": Algorithm(STEPS["rft"], "model", needs_rm=True, env_capable=True, data="rlhf"),
    "dpo": Algorithm(STEPS["dpo"], "model", needs_rm=False, env_capable=False, data="reward"),
    "kto": Algorithm(STEPS["kto"], "model", needs_rm=False, env_capable=False, data="kto"),
    "ilql": Algorithm(STEPS["ilql"], "model", needs_rm=False, env_capable=False, data="reward"),
    # the teacher is the reward: prompts (rlhf shard) or an environment, no reward model
    "distill": Algorithm(STEPS["distill"], "actor", needs_rm=False, env_capable=True, data="rlhf"),
}
Step3Config = PPOConfig | GRPOConfig | DistillConfig | RFTConfig | DPOConfig | KTOConfig | ILQLConfig


@dataclass
class Plan:
    run: Path
    sft: SFTConfig
    reward: RewardConfig
    rl: Step3Config
    algorithm: str
    judge: RewardConfig  # eval.judge=train: step 2's settings on the pairs step 2 never saw (data.reward_shards)
    demos: int = 0       # sft_demos: step 1 trains on this many of the environment's demonstrations

    @property
    def demos_file(self) -> Path:
        return self.run / "demos.jsonl"

    @property
    def spec(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    def outputs(self) -> dict[int, Path]:
        """The folder whose presence means step N finished (written atomically as each step's last act)."""
        if isinstance(self.rl, RFTConfig):
            policy = round_model(self.rl, self.rl.rft.rounds)
        else:
            policy = Path(self.rl.output_dir) / ("actor" if self.spec.model_key == "actor" else "model")
        return {1: self.run / "sft" / "model", 2: self.run / "reward" / "model", 3: policy}

    def env_rewards(self) -> bool:
        """Step 3 plays an environment that rewards by itself (GRPO, RFT): no SFT or reward model needed."""
        return self.spec.env_capable and self.rl.env.name != "chat"  # type: ignore[union-attr]

    def inputs(self) -> dict[int, int | None]:
        """Which earlier step's output step N reads (None: none)."""
        return {2: 1, 3: (1 if self.demos else None) if self.env_rewards() else 2 if self.spec.needs_rm else 1}


def default_steps(plan: Plan) -> list[int]:
    if plan.env_rewards():
        return [1, 3] if plan.demos else [3]
    return [1, 2, 3] if plan.spec.needs_rm else [1, 3]


def _step_config(cls: type, section: str, raw: dict[str, Any], forced: dict[str, Any]) -> Any:
    try:
        return load_config(cls, extra=deep_merge(raw, forced))
    except ChatrlError as e:
        raise ChatrlError(f"pipeline section '{section}': {e}") from None


def build_plan(cfg: PipelineConfig, steps: list[int] | None = None) -> Plan:
    """Derive the three step configs: shared sections copied in, each step's input = the previous output (in an
    environment that rewards by itself, the base model unless step 1 runs or ran, and no reward model unless step 2
    runs or ran)."""
    run = Path(cfg.run_dir)
    alg, section = ALGORITHMS[cfg.algorithm], getattr(cfg, cfg.algorithm)
    own_env = alg.env_capable and section.get("env", {}).get("name", "chat") != "chat"
    if cfg.sft_demos and (cfg.sft_demos < 0 or not own_env):
        raise ChatrlError(f"sft_demos={cfg.sft_demos}: demonstrations need step 3 in an environment "
                          f"({cfg.algorithm}.env.name) and a positive count")
    shared = {"seed": cfg.seed, "data": dataclasses.asdict(cfg.data), "deepspeed": dataclasses.asdict(cfg.deepspeed)}
    base_model = dataclasses.asdict(cfg.model)
    sft_model, rm_model = str(run / "sft" / "model"), str(run / "reward" / "model")

    def model_of(section: dict[str, Any], key: str, input_path: str) -> dict[str, Any]:
        # a section's own model settings (e.g. reward.model.trainable_layers) refine the shared model; the
        # input path is always the previous step's output
        return deep_merge(base_model, {**section.get(key, {}), "name_or_path": input_path})

    # sft_demos: step 1 reads the environment's demonstrations (all of them: one shard), not the data section's
    sft_data = {**shared["data"], "paths": [str(run / "demos.jsonl")], "schema": "chat", "split": "1,0,0",
                "weights": []} if cfg.sft_demos else shared["data"]
    sft = _step_config(SFTConfig, "sft", cfg.sft, {**shared, "data": sft_data, "output_dir": str(run / "sft"),
                                                   "model": model_of(cfg.sft, "model", base_model["name_or_path"])})
    reward = _step_config(RewardConfig, "reward", cfg.reward, {**shared, "output_dir": str(run / "reward"),
                                                               "model": model_of(cfg.reward, "model", sft_model)})
    use_sft = bool(cfg.sft_demos) or not own_env or (steps is not None and 1 in steps) or Path(sft_model).is_dir()
    use_rm = alg.needs_rm and (not own_env or (steps is not None and 2 in steps) or Path(rm_model).is_dir())
    forced = {**shared, "output_dir": str(run / cfg.algorithm),
              alg.model_key: model_of(section, alg.model_key, sft_model if use_sft else base_model["name_or_path"])}
    if use_rm:
        forced["reward"] = {**section.get("reward", {}), "model": rm_model}
    rl = _step_config(alg.config, cfg.algorithm, section, forced)
    judge_data = {**shared["data"], "reward_shards": ["sft", "rlhf"]}
    judge = _step_config(RewardConfig, "reward", cfg.reward, {**shared, "data": judge_data,
                                                              "output_dir": str(run / "judge"),
                                                              "model": model_of(cfg.reward, "model", sft_model)})
    return Plan(run=run, sft=sft, reward=reward, rl=rl, algorithm=cfg.algorithm, judge=judge, demos=cfg.sft_demos)


def preflight(cfg: PipelineConfig, plan: Plan, steps: list[int]) -> None:
    """Fail in seconds on what would otherwise fail after step 2: models, data, disk space."""
    name = cfg.model.name_or_path
    if 1 in steps and name not in ALIASES and not Path(name).is_dir() and "/" not in name:
        raise ChatrlError(f"model.name_or_path={name}: no such folder and not a built-in alias {list(ALIASES)}")
    teacher = plan.rl.grpo.teacher if isinstance(plan.rl, GRPOConfig) else None
    if 3 in steps and teacher and teacher not in ALIASES and not Path(teacher).is_dir() and (
            teacher.count("/") != 1 or teacher.startswith((".", "~", "/"))):  # a folder path, not a hub id
        raise ChatrlError(f"{cfg.algorithm}.grpo.teacher={teacher}: no such model folder; train the teacher first "
                          "(configs/distill-arithmetic.yaml: `make demo-grpo`)")
    for step, kind in ((1, "sft"), (2, "reward"), (3, plan.spec.data)):
        if step in steps and not (step == 3 and plan.env_rewards()) and not (step == 1 and plan.demos):
            records, _ = load_records(cfg.data, kind, "train")
            if not records:
                raise ChatrlError(f"data for step {step} ({kind}) is empty after cleaning and splitting: "
                                  f"check data.paths and data.split={cfg.data.split}")
    for step in steps:  # a later step whose input will not exist and is not produced by an earlier step
        needs = plan.inputs().get(step)
        if needs and needs not in steps and not plan.outputs()[needs].is_dir():
            raise ChatrlError(f"step {step} needs the output of step {needs} ({plan.outputs()[needs]}), "
                              f"which does not exist; run with --steps including {needs}")
    plan.run.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(plan.run).free / 2**30
    if free_gb < 2:
        raise ChatrlError(f"only {free_gb:.1f} GiB free under {plan.run}; checkpoints need at least 2 GiB")


def run_pipeline(cfg: PipelineConfig, steps: list[int] | None = None, force: bool = False) -> Path:
    """Run `steps` (default: the algorithm's: 1,2,3; 1,3 without a reward model; 3 alone in a rewarding
    environment)."""
    plan = build_plan(cfg, steps)
    steps = steps or default_steps(plan)
    preflight(cfg, plan, steps)
    runners = {1: (STEPS["sft"], plan.sft), 2: (STEPS["reward"], plan.reward), 3: (plan.spec.step, plan.rl)}
    for step in steps:
        out = plan.outputs()[step]
        if out.is_dir() and not force:
            print(f"[pipeline] step {step}: {out} already finished, skipping (use --force to re-run)")
            continue
        if force:
            shutil.rmtree(runners[step][1].output_dir, ignore_errors=True)
        if step == 1 and plan.demos:
            write_plan_demos(cfg, plan)
        run = runners[step][0].load()
        print(f"[pipeline] step {step}: {run.__name__} -> {out.parent}")
        run(runners[step][1])
        release_freed_memory()
    if plan.env_rewards():
        run_env_eval(cfg, plan)
    else:
        run_final_eval(cfg, plan)
    report = write_report(plan.run)
    print(f"[pipeline] report: {report}")
    return report


def write_plan_demos(cfg: PipelineConfig, plan: Plan) -> None:
    """sft_demos: the environment's demonstrations, with the tools step 3 offers (written once per run: the file is
    the step's data)."""
    if plan.demos_file.is_file() and len(plan.demos_file.read_text().splitlines()) == plan.demos:
        print(f"[pipeline] demonstrations: {plan.demos_file} exists, reusing it")
        return
    env = plan.rl.env  # type: ignore[union-attr]
    print(f"[pipeline] demonstrations: {plan.demos} reference solutions of {env.name} -> {plan.demos_file}")
    write_demos(plan.demos_file, env.name, env.kwargs, plan.demos, settings=env, seed=cfg.seed)


def release_freed_memory() -> None:
    """After a step: collect its models and engines, then hand glibc's freed heap back to the OS (malloc_trim), so
    the next step's peak does not sit on top of the previous step's retained arenas."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def run_env_eval(cfg: PipelineConfig, plan: Plan) -> None:
    """Base (and SFT, when it ran) vs the step-3 policy on the environment's held-out tasks."""
    assert isinstance(plan.rl, (GRPOConfig, RFTConfig))
    actor = plan.outputs()[3]
    if not actor.is_dir():
        print("[pipeline] eval skipped: step 3 has not finished")
        return
    models = {"base": cfg.model.name_or_path} if cfg.eval.include_base else {}
    if plan.outputs()[1].is_dir():
        models["sft"] = str(plan.outputs()[1])
    models[plan.algorithm] = str(actor)
    env, r = plan.rl.env, plan.rl.rollout
    plain = ()
    if cfg.eval.without_tools:  # the starting model with no tools offered: the first row, what tools add is vs it
        models = {"base_no_tools": cfg.model.name_or_path, **models}
        plain = ("base_no_tools",)
    results = evaluate_env(models, env.name, env.kwargs, n_tasks=cfg.eval.env_tasks, k=cfg.eval.pass_k,
                           temperature=r.temperature, max_new_tokens=cfg.eval.max_new_tokens,
                           max_turns=env.max_turns, max_context=env.max_context, batch_size=cfg.eval.batch_size,
                           seed=cfg.seed, dtype=cfg.eval.dtype, log=lambda msg: print(f"[eval] {msg}"),
                           tool_settings=env, without_tools=plain)
    save_env_result(results, plan.run / "eval", env.name)


def train_judge(plan: Plan) -> str:
    """eval.judge=train: a second reward model with step 2's settings, trained on the sft and rlhf shards' pairs
    (step 2 trains on the reward shard's; the eval prompts are the rlhf shard's held-out part), once per run."""
    out = Path(plan.judge.output_dir) / "model"
    if out.is_dir():
        print(f"[pipeline] judge: {out} already trained, reusing it")
    else:
        print(f"[pipeline] judge: a second reward model on pairs step 2 never saw -> {out.parent}")
        STEPS["reward"].load()(plan.judge)
        release_freed_memory()
    return str(out)


def run_final_eval(cfg: PipelineConfig, plan: Plan) -> None:
    """Base vs SFT vs the step-3 policy on held-out prompts: reward-model score, win rate, KL to the SFT model, ..."""
    outs = plan.outputs()
    if not all(outs[step].is_dir() for step in default_steps(plan)):
        print("[pipeline] eval skipped: not all steps have finished")
        return
    reward_model = cfg.eval.reward_model or (str(outs[2]) if outs[2].is_dir() else None)
    judge = train_judge(plan) if cfg.eval.judge == "train" else cfg.eval.judge
    prompts, _ = load_records(cfg.data, "rlhf", "eval")
    prompts = prompts[:cfg.eval.num_prompts]
    models = {"base": cfg.model.name_or_path} if cfg.eval.include_base else {}
    models.update({"sft": str(outs[1]), plan.algorithm: str(outs[3])})
    result = evaluate_models(models, prompts, reward_model=reward_model, judge_model=judge,
                             reference_model=str(outs[1]),
                             max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                             seed=cfg.seed, dtype=cfg.eval.dtype, max_prompt_tokens=cfg.data.max_prompt_length,
                             log=lambda msg: print(f"[eval] {msg}"))
    save_result(result, plan.run / "eval")
    (plan.run / "eval" / "summary.json").write_text(json.dumps(result.metrics, indent=1))

    Console().print(rich_table(result))
