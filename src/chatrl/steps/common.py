"""Start-up and finish shared by the training steps: process group, seeds, tokenizer, saved config,
final HF folder."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrl.engine.deepspeed import device, init_distributed
from chatrl.steps.trainer import LoopSettings, full_state_dict, save_config


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_step(cfg: Any, name: str, model_cfg: Any = None) -> StepContext:
    """Init the process group, seed, write `config.yaml`, load the tokenizer of `model_cfg` (default cfg.model)."""
    from chatrl.models.loading import load_tokenizer, resolve_dtype

    rank, world = init_distributed()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if rank == 0:
        save_config(cfg, out)
    model_cfg = model_cfg or cfg.model
    bf16 = resolve_dtype(model_cfg.dtype) == torch.bfloat16
    return StepContext(rank=rank, world=world, device=device(), tokenizer=load_tokenizer(model_cfg.name_or_path),
                       bf16=bf16, weights_dtype=torch.float32, output_dir=out, model_dir=out / "model")


def loop_settings(cfg: Any) -> LoopSettings:
    return LoopSettings(output_dir=cfg.output_dir, seed=cfg.seed, optim=cfg.optim, deepspeed=cfg.deepspeed,
                        logging=cfg.logging, checkpoint=cfg.checkpoint)


def finish_model(ctx: StepContext, engine: Any, *, merge_lora: bool, dir_name: str = "model") -> Path:
    """Write the trained module as a plain HF folder on rank 0 (ZeRO-3 weights gathered first, on all ranks)."""
    from chatrl.models.saving import save_hf_folder

    state = full_state_dict(engine)
    out = ctx.output_dir / dir_name
    if ctx.rank == 0:
        save_hf_folder(engine.module, ctx.tokenizer, out, merge_lora=merge_lora, state_dict=state)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    return out
