"""The one DeepSpeed-engine builder every training step uses.

We generate the DeepSpeed JSON from our typed config (ZeRO stage, offload, precision, batch sizes,
clipping) and hand DeepSpeed a torch LR schedule (warmup + cosine/linear/constant) so it is saved in
checkpoints. A user's raw DeepSpeed JSON (`deepspeed.raw_config`) is merged over the generated one. `gathered` is
the one way to read ZeRO-3's partitioned parameters whole (the rollout's inference copy, the EMA).

Precision: bf16 under ZeRO >= 1 uses DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the ZeRO
optimizer). ZeRO 0 has no master copy in DeepSpeed's bf16 mode (updates of 1e-5 vanish in bf16), so
there we keep fp32 weights and run the forward under DeepSpeed's torch_autocast in bf16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chatrl.config import DeepSpeedConfig, OptimConfig
from chatrl.configbase import deep_merge
from chatrl.errors import ChatrlError
from chatrl.paths import setup_extension_cache


class _NoCpuProbeWarning(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
    it." (deepspeed/accelerator/real_accelerator.py, logged on the "DeepSpeed" logger by the first get_accelerator(),
    i.e. on `import deepspeed`, in every process of every run on a machine without a GPU): chatrl says the device
    itself, once (`device`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_accelerator_probe() -> None:
    """Install the filter above (idempotent); it must run before DeepSpeed is first imported, hence at this
    module's import: the CLI imports this module at start-up, the step modules before their `import deepspeed`."""
    logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logging creates: same name, same object
    if not any(isinstance(f, _NoCpuProbeWarning) for f in logger.filters):
        logger.addFilter(_NoCpuProbeWarning())


quiet_accelerator_probe()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start the process group (gloo on CPU, nccl on GPU via DeepSpeed's accelerator); return (rank, world).

    Without a launcher we set single-rank env defaults, so `chatrl sft ...` just works in one process."""
    setup_extension_cache()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed  # lazy: deepspeed takes seconds to import; only training needs it

    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """End cleanly (torchrun may abort at exit otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_device_said = False


def device() -> torch.device:
    """This rank's device; rank 0 says it on stderr the first time (one line, in place of DeepSpeed's probe)."""
    global _device_said
    from deepspeed.accelerator import get_accelerator  # lazy: see init_distributed

    acc = get_accelerator()
    dev = torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.device_name(), acc.current_device())
    if not _device_said and (not dist.is_initialized() or dist.get_rank() == 0):
        world = dist.get_world_size() if dist.is_initialized() else 1
        where = ("the CPU (no GPU found)" if dev.type == "cpu" else
                 f"{dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else acc.device_name()})")
        print(f"chatrl: training on {where}" + (f", {world} processes" if world > 1 else ""), file=sys.stderr,
              flush=True)
    _device_said = True
    return dev


def gathered(params: Iterable[torch.nn.Parameter], enabled: bool,
             modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """ZeRO-3's partitioned `params` gathered whole on every rank for the block (one all-gather for all of them),
    partitioned again after; a no-op when not `enabled` (ZeRO 0-2 keep whole parameters). modifier_rank=None: the
    block only reads them; a rank's number: its writes are broadcast on exit. A collective: every rank enters it."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed  # lazy: deepspeed takes seconds to import; only training needs it

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the peak LR at optimizer step `s`: linear warmup, then cosine/linear decay to 0 or constant."""
    warm = max(0, optim.warmup_steps)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if optim.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_ds_config(optim: OptimConfig, ds: DeepSpeedConfig, *, bf16: bool, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for these settings (before a user's raw config is merged over it)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        # gather small params eagerly; keeps CPU runs of small models from thrashing on tiny all-gathers
        zero["stage3_param_persistence_threshold"] = 1e4
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.micro_batch_size * optim.grad_accum * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if bf16 and ds.zero_stage >= 1:
        config["bf16"] = {"enabled": True}
    elif bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if ds.offload_optimizer:  # DeepSpeed builds its CPU Adam from this entry
        config["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                                          "eps": optim.eps, "weight_decay": optim.weight_decay}}
    if ds.raw_config:
        path = Path(ds.raw_config)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ChatrlError(f"deepspeed.raw_config={path}: cannot read it as JSON ({e})") from None
        config = deep_merge(config, raw)
    return config


def initialize(model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, *, bf16: bool,
               total_steps: int, world_size: int):
    """Wrap `model` in a DeepSpeed engine with our optimizer, LR schedule and precision. Returns the engine."""
    import deepspeed  # lazy: deepspeed takes seconds to import; only training needs it

    config = build_ds_config(optim, ds, bf16=bf16, world_size=world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ChatrlError("no trainable parameters (check model.lora settings)")
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay, fused=optim.fused or None)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                      lr_scheduler=scheduler, config=config)
    return engine
