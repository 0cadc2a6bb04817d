"""Start-up and finish shared by the training steps: process group, seeds, tokenizer, saved config,
final HF folder with its model card."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from chatrl.configbase import to_dict
from chatrl.engine.collectives import barrier
from chatrl.engine.deepspeed import device, init_distributed
from chatrl.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from chatrl.models.lora import plain_model
from chatrl.models.model_card import ModelCard, base_model_of, data_source, final_metrics, render
from chatrl.models.saving import save_hf_folder
from chatrl.steps.supervised import LoopSettings, TrainTask, full_state_dict, save_config, train
from chatrl.trackers import check_available, flatten

# The settings a model card lists besides the step's own section (when the step's config has them).
_CARD_KEYS = ("model.name_or_path", "actor.name_or_path", "model.lora.r", "actor.lora.r", "model.trainable_layers",
              "actor.trainable_layers", "optim.lr", "actor_optim.lr", "critic_optim.lr", "optim.epochs",
              "optim.max_steps", "optim.micro_batch_size", "optim.grad_accum", "data.max_length", "env.name",
              "rollout.prompts_per_rollout", "rollout.samples_per_prompt", "rollout.max_new_tokens",
              "rollout.temperature", "reward.model", "reward.functions", "deepspeed.zero_stage", "seed")
# The step's own options section where it is not named after the step (the reward model's loss is rm_loss: in the
# RL steps `reward` is where rewards come from).
_OWN_SECTION = {"reward": "rm_loss", "distill": "grpo"}  # distill is GRPO with a teacher: its options are grpo.*


@dataclass
class StepContext:
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    bf16: bool                 # train in bf16 (DeepSpeed bf16 mode, or autocast under ZeRO 0)
    weights_dtype: torch.dtype  # dtype models are loaded in before DeepSpeed takes them (fp32 master weights)
    output_dir: Path
    model_dir: Path             # where the final HF folder goes
    step: str = ""              # the step's name (sft, reward, ppo, grpo, ...): model cards name it
    config: Any = None          # the step's config: model cards list its settings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_step(cfg: Any, name: str, model_cfg: Any = None) -> StepContext:
    """Init the process group, seed, write `config.yaml`, load the tokenizer of `model_cfg` (default cfg.model)."""
    check_available(cfg.logging.report_to)  # a missing tracker package fails before any work
    rank, world = init_distributed()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if rank == 0:
        save_config(cfg, out)
    model_cfg = model_cfg or cfg.model
    bf16 = resolve_dtype(model_cfg.dtype) == torch.bfloat16
    return StepContext(rank=rank, world=world, device=device(), tokenizer=load_tokenizer(model_cfg.name_or_path),
                       bf16=bf16, weights_dtype=torch.float32, output_dir=out, model_dir=out / "model", step=name,
                       config=cfg)


def loop_settings(cfg: Any) -> LoopSettings:
    return LoopSettings(output_dir=cfg.output_dir, seed=cfg.seed, optim=cfg.optim, deepspeed=cfg.deepspeed,
                        logging=cfg.logging, checkpoint=cfg.checkpoint)


def finish_model(ctx: StepContext, engine: Any, *, merge_lora: bool, dir_name: str = "model",
                 base: str | None = None, data: list[str] | None = None) -> Path:
    """Write the trained module as a plain HF folder on rank 0 (ZeRO-3 weights gathered first, on all ranks),
    with a model card. `base` / `data`: what the card names as the start model and the training data (default:
    the config's model.name_or_path and data.paths)."""
    state = full_state_dict(engine)
    out = ctx.output_dir / dir_name
    if ctx.rank == 0:
        card = model_card(ctx, out, engine.module, base=base, data=data)
        save_hf_folder(engine.module, ctx.tokenizer, out, merge_lora=merge_lora, state_dict=state, card=card)
    barrier()
    return out


def train_policy(ctx: StepContext, cfg: Any, task: TrainTask) -> Path:
    """The supervised loop on `task`, starting from cfg.model; saves `<output_dir>/model` (LoRA merged if
    cfg.model.lora.merge_on_save) and prints the final evaluation. Returns that folder."""
    model = load_causal_lm(cfg.model, dtype=ctx.weights_dtype, tokenizer=ctx.tokenizer)
    metrics = train(task, model, loop_settings(cfg), bf16=ctx.bf16, rank=ctx.rank, world=ctx.world,
                    on_done=lambda engine: finish_model(ctx, engine, merge_lora=cfg.model.lora.merge_on_save))
    if ctx.rank == 0 and metrics:
        print(f"{task.name} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return ctx.model_dir


def model_card(ctx: StepContext, folder: Path, module: torch.nn.Module, *, base: str | None = None,
               data: list[str] | None = None) -> str | None:
    """The README.md of a model folder this step writes: start model, data, key settings, final metrics (the
    last eval row of the run's metrics.jsonl, else its last row: for an RL step, the last iteration)."""
    cfg = ctx.config
    if cfg is None:  # a context built by hand (tests, tools): nothing to describe
        return None
    model_cfg = getattr(cfg, "model", None) or getattr(cfg, "actor", None)
    base = base or (model_cfg.name_or_path if model_cfg is not None else "unknown")
    data = data if data is not None else list(getattr(getattr(cfg, "data", None), "paths", []))
    split, step, metrics = final_metrics(ctx.output_dir)
    card = ModelCard(folder=str(folder), step=ctx.step, role=folder.name, kind=_kind(module),
                     base=base_model_of(base), data=[data_source(p) for p in data],
                     settings=key_settings(cfg, ctx.step, ctx.world), metrics=metrics, metrics_split=split,
                     metrics_step=step, config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return render(card)


def key_settings(cfg: Any, step: str, world: int) -> dict[str, Any]:
    """The settings a reader of a model card wants first: start model, LoRA, LR and batch, the step's own options."""
    tree = to_dict(cfg)
    flat = flatten(tree)
    picked = {k: flat[k] for k in _CARD_KEYS if k in flat and flat[k] not in (None, "", [])}
    picked["processes"] = world
    section = _OWN_SECTION.get(step, step)
    own = tree.get(section)
    if isinstance(own, dict):  # the step's own section: sft.*, rm_loss.* (reward model), ppo.*, grpo.*, dpo.*...
        picked.update(flatten(own, f"{section}."))
    return picked


def _kind(module: torch.nn.Module) -> str:
    """`chat` for a causal LM, `score` for a sequence-score model (reward model, critic)."""
    inner = plain_model(module)
    return "chat" if getattr(inner, "can_generate", lambda: False)() else "score"
