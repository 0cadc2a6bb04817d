"""Config sections shared by every step, declared once, and one dataclass per step built from them.

Load with `chatrl.configbase.load_config(SFTConfig, "configs/x.yaml", ["optim.lr=1e-4"])`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrl.configbase import opt, sub
from chatrl.errors import ChatrlError

# ============================================================================ shared sections


@dataclass
class LoraConfig:
    """LoRA adapters through peft (r=0 disables LoRA)."""

    r: int = opt(0, "LoRA rank; 0 trains the full model")
    alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on the LoRA branch")
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")
    only_optimize_lora: bool = opt(True, "freeze the base weights and train only the adapters")
    merge_on_save: bool = opt(True, "merge adapters into the weights when saving, so the folder is a plain model")


@dataclass
class ModelConfig:
    """Which model to start from and how to hold it."""

    name_or_path: str = opt("smollm2-135m-instruct",
                            "local HF folder, hub id, or built-in alias (smollm2-135m-instruct, tiny-random)")
    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "weights/compute dtype; auto = bf16 when the CPU/GPU supports it")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    trainable_layers: Optional[int] = opt(None, "train only the top N transformer blocks (+ final norm and head); "
                                                "embeddings and lower blocks stay frozen, so backward stops early "
                                                "(trlx's num_layers_unfrozen). None = train all")
    allow_pickle: bool = opt(False, "load a model folder whose only weights are pickle files (pytorch_model.bin), "
                                    "which can run code when loaded: only for files you trust (else: safetensors)")
    lora: LoraConfig = sub(LoraConfig)


@dataclass
class DataConfig:
    """Where data comes from and how it is cleaned, split and tokenized."""

    paths: list[str] = opt(["builtin:hh-rlhf-harmless"],
                           "data files/folders/hub names; builtin:hh-rlhf-harmless is the shipped sample")
    weights: list[float] = opt([], "blend weights per path (empty = all 1.0)")
    schema: str = opt("auto", "force a schema (auto, preference, hh, chat, prompt_response, alpaca, prompt)")
    split: str = opt("2,4,4", "relative shares of each dataset for SFT, reward, RLHF (DeepSpeed-Chat's data_split)")
    eval_fraction: float = opt(0.05, "fraction of every shard held out for evaluation")
    reward_shards: list[str] = opt(["reward"], "shards whose train pairs the reward step trains on: [reward] for "
                                               "the policy's reward model; the eval's judge trains on [sft, rlhf], "
                                               "pairs that model never saw (its held-out pairs: the reward shard's)")
    seed: int = opt(1234, "seed for the deterministic split and shuffling")
    max_length: int = opt(512, "max tokens of prompt + response")
    max_prompt_length: int = opt(256, "max prompt tokens (longer prompts are left-truncated or dropped)")
    overlength: Literal["drop", "truncate"] = opt("truncate", "what to do with rows over the length limits")
    skip_bad_rows: bool = opt(False, "skip malformed rows (counted and reported) instead of failing")
    max_rows: Optional[int] = opt(None, "use at most this many rows per dataset (after cleaning); None = all")


@dataclass
class OptimConfig:
    """Optimizer, schedule and batch sizes of a training step."""

    lr: float = opt(1e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon: added to sqrt(v); larger damps the steps of near-zero gradients")
    fused: bool = opt(True, "torch's fused AdamW (one pass per tensor: ~5x faster optimizer steps on CPU, "
                            "bench/NOTES.md); false = torch's for-loop AdamW; deepspeed.offload_optimizer uses "
                            "DeepSpeed's CPU Adam instead")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "LR schedule after warmup")
    warmup_steps: int = opt(0, "linear warmup steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    epochs: int = opt(1, "passes over the training shard")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (overrides epochs)")
    micro_batch_size: int = opt(4, "sequences per process per forward pass")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_bad_steps: int = opt(3, "skip an optimizer step whose loss or gradients are not finite (counted as "
                                "bad_steps); stop after this many in a row (0 = never stop)")


@dataclass
class DeepSpeedConfig:
    """How the DeepSpeed engine is configured (generated from these fields)."""

    zero_stage: int = opt(0, "ZeRO stage 0, 1, 2 or 3")
    offload_optimizer: bool = opt(False, "keep optimizer states on CPU (ZeRO >= 1; uses DeepSpeed's CPU Adam)")
    offload_params: bool = opt(False, "keep parameters on CPU (ZeRO 3 only)")
    raw_config: Optional[str] = opt(None, "path to a DeepSpeed JSON whose keys override the generated config")


@dataclass
class LoggingConfig:
    """Progress, metrics and evaluation cadence."""

    log_every: int = opt(1, "log metrics every N optimizer steps")
    eval_every: int = opt(0, "evaluate every N optimizer steps (0 = only at the end)")
    progress: bool = opt(True, "show a progress bar")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = opt(
        ["tensorboard"], "experiment trackers, all local to the run dir: tensorboard, mlflow (SQLite store in "
                         "mlflow/), wandb (offline unless WANDB_MODE is set); [] = metrics.jsonl only")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (written atomically, last K kept)."""

    every: int = opt(0, "save a resumable checkpoint every N optimizer steps (0 = only at the end)")
    keep_last: int = opt(2, "how many resumable checkpoints to keep")
    resume: str = opt("auto", "auto = continue from the newest complete checkpoint; never; or a checkpoint path")
    keep_final_state: bool = opt(False, "keep the resumable checkpoints (optimizer state) of a finished step; "
                                        "false deletes them once the final model folder is written")


def check_common(model: ModelConfig, ds: DeepSpeedConfig, optim: OptimConfig) -> None:
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ChatrlError(f"deepspeed.zero_stage={ds.zero_stage}: must be 0, 1, 2 or 3")
    if ds.offload_params and ds.zero_stage != 3:
        raise ChatrlError("deepspeed.offload_params=true needs deepspeed.zero_stage=3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ChatrlError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage>=1")
    if optim.micro_batch_size < 1 or optim.grad_accum < 1:
        raise ChatrlError("optim.micro_batch_size and optim.grad_accum must be >= 1")
    if model.lora.r < 0:
        raise ChatrlError("model.lora.r must be >= 0 (0 disables LoRA)")
    if model.trainable_layers is not None and (model.trainable_layers < 0 or model.lora.r > 0):
        raise ChatrlError(f"model.trainable_layers={model.trainable_layers}: must be >= 0 and cannot be combined "
                          "with LoRA (model.lora.r > 0); use one way of limiting what trains")


# ============================================================================ step configs


@dataclass
class SFTOptions:
    """Options specific to supervised fine-tuning."""

    train_on_prompt: bool = opt(False, "also compute the loss on prompt tokens (default: assistant tokens only)")
    packing: bool = opt(False, "pack several conversations into one max_length row")


@dataclass
class SupervisedStepConfig:
    """Sections shared by the supervised steps (SFT and reward model); each step adds its own section."""

    output_dir: str = opt("runs/step", "where checkpoints, metrics and the final HF model folder go")
    seed: int = opt(42, "seed for model/head init, shuffling and dropout")
    model: ModelConfig = sub(ModelConfig)
    data: DataConfig = sub(DataConfig)
    optim: OptimConfig = sub(OptimConfig)
    deepspeed: DeepSpeedConfig = sub(DeepSpeedConfig)
    logging: LoggingConfig = sub(LoggingConfig)
    checkpoint: CheckpointConfig = sub(CheckpointConfig)

    def check(self) -> None:
        check_common(self.model, self.deepspeed, self.optim)


@dataclass
class SFTConfig(SupervisedStepConfig):
    """Step 1: supervised fine-tuning."""

    output_dir: str = opt("runs/sft", "where checkpoints, metrics and the final HF model folder go")
    sft: SFTOptions = sub(SFTOptions)

    def check(self) -> None:
        super().check()
        if self.sft.packing and self.data.max_length < 16:
            raise ChatrlError("sft.packing needs data.max_length >= 16")


@dataclass
class RewardLossOptions:
    """The reward model's pairwise (Bradley-Terry) loss. (Named rm_loss, not reward: in the RL steps `reward` is
    where rewards come from.)"""

    center_coef: float = opt(0.0, "reward centring: adds coef * mean((r_chosen + r_rejected)^2) to keep scores near 0")
    use_margin: bool = opt(True, "subtract the data's margin column (when present) inside the Bradley-Terry loss")


@dataclass
class RewardConfig(SupervisedStepConfig):
    """Step 2: reward model on preference pairs (Bradley-Terry)."""

    output_dir: str = opt("runs/reward", "where checkpoints, metrics and the final reward-model folder go")
    rm_loss: RewardLossOptions = sub(RewardLossOptions)

    def check(self) -> None:
        super().check()
        if self.rm_loss.center_coef < 0:
            raise ChatrlError("rm_loss.center_coef must be >= 0")


@dataclass
class EvalOptions:
    """The pipeline's final evaluation on held-out prompts (the RLHF shard's eval split)."""

    num_prompts: int = opt(32, "held-out prompts to evaluate on")
    max_new_tokens: int = opt(64, "max response tokens")
    batch_size: int = opt(8, "prompts generated together")
    include_base: bool = opt(True, "also evaluate the starting model")
    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "dtype of the evaluated models (fp32 = exact but ~2x slower)")
    env_tasks: int = opt(200, "algorithm=grpo with an environment: held-out tasks per model")
    pass_k: int = opt(4, "algorithm=grpo with an environment: samples per task for pass@k (0 = skip)")
    reward_model: Optional[str] = opt(None, "score replies with this reward-model folder (default: the run's own "
                                           "step 2 output; algorithm=dpo has none, e.g. use another run's)")
    without_tools: bool = opt(False, "with an environment whose episodes offer tools: also play the starting model "
                                     "with no tools offered (env.tools and env.kwargs.tools dropped), as the first "
                                     "row 'base_no_tools'")
    judge: Optional[str] = opt(None, "an independent judge scoring the replies beside the reward model: 'train' = "
                                     "a second reward model with step 2's settings on pairs step 2 never saw "
                                     "(<run_dir>/judge, trained once), or a reward-model folder; None = no judge")


@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO | GRPO | RFT -> eval -> report in one run directory; or SFT -> DPO | KTO | ILQL ->
    eval -> report (the preference pairs, or KTO's labelled replies, train the policy directly, no reward model
    step).

    `model`, `data`, `deepspeed` and `seed` are set once here and passed to every step; the sections
    `sft`, `reward` and the one of `algorithm` hold the rest of each step's config (same keys as `chatrl sft|reward|
    ppo|grpo|distill|rft|dpo|kto|ilql --help`, e.g. `sft.optim.lr=2e-5`). Paths between steps are filled in by the
    pipeline. With algorithm=grpo|rft|distill and an environment that rewards by itself (grpo.env.name), the default
    is step 3 alone on the base model; with algorithm=dpo|kto|ilql|distill (distill on chat prompts: its teacher is
    the reward), steps 1 and 3."""

    run_dir: str = opt("runs/demo", "run directory: <run_dir>/sft, reward, ppo|grpo|distill|rft|dpo|kto|ilql, eval, "
                                    "report.html")
    seed: int = opt(42, "seed passed to every step")
    algorithm: Literal["ppo", "grpo", "distill", "rft", "dpo", "kto", "ilql"] = opt(
        "ppo", "step 3: ppo (actor + critic + reward model), grpo, distill (on-policy distillation from "
               "distill.grpo.teacher), rft (best-of-n + SFT rounds), or the offline dpo, "
               "kto and ilql (on the preference pairs, or kto's labelled replies; step 2 is not run)")
    model: ModelConfig = sub(ModelConfig)
    data: DataConfig = sub(DataConfig)
    deepspeed: DeepSpeedConfig = sub(DeepSpeedConfig)
    sft: dict = opt({}, "step 1 settings (see `chatrl sft --help`)")
    reward: dict = opt({}, "step 2 settings (see `chatrl reward --help`)")
    ppo: dict = opt({}, "step 3 settings with algorithm=ppo (see `chatrl ppo --help`)")
    grpo: dict = opt({}, "step 3 settings with algorithm=grpo (see `chatrl grpo --help`)")
    rft: dict = opt({}, "step 3 settings with algorithm=rft (see `chatrl rft --help`)")
    dpo: dict = opt({}, "step 3 settings with algorithm=dpo (see `chatrl dpo --help`)")
    kto: dict = opt({}, "step 3 settings with algorithm=kto (see `chatrl kto --help`)")
    ilql: dict = opt({}, "step 3 settings with algorithm=ilql (see `chatrl ilql --help`)")
    distill: dict = opt({}, "step 3 settings with algorithm=distill (see `chatrl distill --help`; the teacher: "
                            "grpo.teacher)")
    sft_demos: int = opt(0, "with an environment (algorithm grpo|rft|distill): step 1 is SFT on this many "
                            "demonstrations the environment writes from its reference solutions (its solution() "
                            "method; tool calls included when step 3 offers tools), written to <run_dir>/demos.jsonl; "
                            "0 = none")
    eval: EvalOptions = sub(EvalOptions)
