"""Model cards: the `README.md` every saved model folder carries, in the Hugging Face format (YAML front matter
with base_model, license, tags, datasets; then text). `ModelCard` holds the facts, `render` writes the text;
the helpers find what a card says about a base model, a data source and a run's final metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from chatrl.models.builtin import SMOLLM2, TINY
from chatrl.paths import builtin_data_dir

# What chatrl knows of its built-in models and data sets: the hub ids a card's front matter links to.
_BUILTIN_MODELS = {SMOLLM2: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                   TINY: (None, "apache-2.0")}  # random weights made by chatrl (Apache-2.0), SmolLM2's tokenizer
_BUILTIN_DATASETS = {"hh-rlhf-harmless": "Anthropic/hh-rlhf", "gsm8k": "openai/gsm8k"}
_STEPS = {"sft": "supervised fine-tuning (next-token loss on the assistant's tokens)",
          "reward": "a Bradley-Terry reward model trained on (chosen, rejected) pairs",
          "ppo": "PPO (actor-critic RL against a reward)", "grpo": "critic-free group-relative RL (GRPO family)",
          "dpo": "direct preference optimisation on (chosen, rejected) pairs",
          "kto": "Kahneman-Tversky optimisation (KTO) on replies labelled desirable or undesirable",
          "ilql": "offline RL with implicit language Q-learning"}

Kind = Literal["chat", "score"]  # a causal LM that chats, or a scalar-output model (reward model, critic)


@dataclass
class DataSource:
    path: str                       # as the config names it (builtin:NAME, a file, a hub name)
    dataset_id: str | None = None   # a hub data set id, for the front matter
    license: str | None = None      # e.g. "MIT License", from a LICENSE file beside the data


@dataclass
class BaseModel:
    name_or_path: str               # what the step loaded
    hub_id: str | None = None       # the nearest ancestor on the hub (base_model in the front matter)
    license: str | None = None      # SPDX id, inherited from the base


@dataclass
class ModelCard:
    folder: str                     # where the model folder is written (used in the snippets)
    step: str                       # sft, reward, ppo, grpo, ...
    role: str                       # model, actor, critic, actor_ema, ...
    kind: Kind
    base: BaseModel
    data: list[DataSource] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)   # key settings, by their dotted config names
    metrics: dict[str, float] = field(default_factory=dict)  # final metrics of the run
    metrics_split: str = ""
    metrics_step: int | None = None
    config_yaml: str = ""           # the step's whole config


def base_model_of(name_or_path: str) -> BaseModel:
    """A built-in alias, a local folder (whose own card names its base) or a hub id."""
    if name_or_path in _BUILTIN_MODELS:
        hub_id, license_id = _BUILTIN_MODELS[name_or_path]
        return BaseModel(name_or_path, hub_id, license_id)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        meta = front_matter((folder / "README.md").read_text()) if (folder / "README.md").exists() else {}
        return BaseModel(name_or_path, meta.get("base_model"), meta.get("license"))
    return BaseModel(name_or_path, name_or_path)


def data_source(path: str) -> DataSource:
    """Hub id and license of a data path: built-in data sets and folders that ship a LICENSE file."""
    folder, dataset_id = None, None
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        folder, dataset_id = builtin_data_dir() / name, _BUILTIN_DATASETS.get(name)
    elif Path(path).expanduser().exists():
        local = Path(path).expanduser().resolve()
        folder = local if local.is_dir() else local.parent
        if folder.parent == builtin_data_dir().resolve():
            dataset_id = _BUILTIN_DATASETS.get(folder.name)
    else:
        dataset_id = path  # a hub name
    license_file = folder / "LICENSE" if folder is not None else None
    first = license_file.read_text().strip().splitlines()[0].strip() if license_file and license_file.exists() else None
    return DataSource(path, dataset_id, first)


def final_metrics(run_dir: Path) -> tuple[str, int | None, dict[str, float]]:
    """(split, step, metrics) of the last eval row of `metrics.jsonl`, else of its last row."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    evals = [r for r in rows if r.get("split") == "eval"]
    row = (evals or rows or [{}])[-1]
    numbers = {k: float(v) for k, v in row.items()
               if k not in ("step", "split", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return row.get("split", ""), row.get("step"), numbers


def front_matter(text: str) -> dict[str, Any]:
    """The YAML between the leading `---` lines of a card ({} when there is none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    return (yaml.safe_load(text[4:end]) or {}) if end > 0 else {}


def render(card: ModelCard) -> str:
    meta: dict[str, Any] = {}
    if card.base.hub_id:
        meta["base_model"] = card.base.hub_id
    if card.base.license:
        meta["license"] = card.base.license
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation" if card.kind == "chat" else "text-classification"
    meta["tags"] = ["chatrl", card.step] + (["conversational"] if card.kind == "chat" else ["reward-model"])
    datasets = [d.dataset_id for d in card.data if d.dataset_id]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    parts = ["---\n" + yaml.safe_dump(meta, sort_keys=False) + "---", _intro(card), _training(card),
             _metrics(card), _usage(card), _license(card)]
    if card.config_yaml:
        parts.append("<details><summary>The step's whole config</summary>\n\n```yaml\n"
                     + card.config_yaml.rstrip() + "\n```\n</details>")
    return "\n\n".join(p for p in parts if p) + "\n"


def _intro(card: ModelCard) -> str:
    what = "A chat model" if card.kind == "chat" else "A scalar-output model (one score per sequence)"
    folder = Path(card.folder)
    return (f"# {folder.parent.name}/{folder.name}\n\n{what} written by chatrl's `{card.step}` "
            f"step: {_STEPS.get(card.step, card.step)}. A plain Hugging Face folder (safetensors): `transformers` "
            f"loads it as it is.")


def _training(card: ModelCard) -> str:
    base = f"`{card.base.name_or_path}`"
    if card.base.hub_id and card.base.hub_id != card.base.name_or_path:
        base += f" (from [{card.base.hub_id}](https://huggingface.co/{card.base.hub_id}))"
    lines = ["## Training", "", f"- started from: {base}", f"- step: `{card.step}` (this folder: `{card.role}`)"]
    for d in card.data:
        extra = ", ".join(x for x in (d.dataset_id, d.license) if x)
        lines.append(f"- data: `{d.path}`" + (f" ({extra})" if extra else ""))
    if card.settings:
        lines += ["", "| key setting | value |", "|---|---|"]
        lines += [f"| `{k}` | {_cell(v)} |" for k, v in card.settings.items()]
    return "\n".join(lines)


def _metrics(card: ModelCard) -> str:
    if not card.metrics:
        return ""
    where = f"{card.metrics_split} split, step {card.metrics_step}" if card.metrics_split else "last logged row"
    rows = [f"| `{k}` | {v:.4g} |" for k, v in card.metrics.items()]
    return "\n".join([f"## Final metrics ({where})", "", "| metric | value |", "|---|---:|", *rows])


def _usage(card: ModelCard) -> str:
    path = json.dumps(card.folder)
    if card.kind == "chat":
        code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tok = AutoTokenizer.from_pretrained({path})\n"
                f"model = AutoModelForCausalLM.from_pretrained({path})\n"
                f'messages = [{{"role": "user", "content": "How do I make a cup of tea?"}}]\n'
                f"inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                f"return_dict=True)\n"
                f"out = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
                f'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))')
        cli = (f"chatrl chat --model {card.folder}            # terminal chat\n"
               f"chatrl serve --model {card.folder}           # OpenAI-compatible API + web chat\n"
               f"chatrl export --format gguf {card.folder} model.gguf   # for llama.cpp / ollama")
    else:
        code = (f"from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"tok = AutoTokenizer.from_pretrained({path})\n"
                f"model = AutoModelForSequenceClassification.from_pretrained({path})\n"
                f'chat = [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "Hello!"}}]\n'
                f"text = tok.apply_chat_template(chat, tokenize=False)\n"
                f'print(model(**tok(text, return_tensors="pt")).logits[0, 0].item())  # higher = better')
        cli = f"chatrl score --model {card.folder} --data pairs.jsonl   # per-row scores, accuracy on pairs"
    return f"## Use\n\n```python\n{code}\n```\n\n```bash\n{cli}\n```"


def _license(card: ModelCard) -> str:
    lines = ["## License", ""]
    lines.append(f"- weights: {card.base.license or 'unknown'} (as the base model's)" if card.base.license
                 else "- weights: the base model's license applies (unknown to chatrl)")
    for d in card.data:
        lines.append(f"- data `{d.path}`: {d.license or 'unknown: check the data set terms'}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|")
