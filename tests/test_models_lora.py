"""LoRA: which parameters train, merge-for-save on a copy, merged state dicts, the wrappers."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from chatrl.config import LoraConfig, ModelConfig
from chatrl.models.loading import load_causal_lm, load_tokenizer
from chatrl.models.lora import (
    lora_layers,
    lora_scaling,
    merge_lora_for_save,
    merge_lora_state_dict,
    plain_model,
)

IDS = torch.tensor([[1, 17, 300, 4000, 2, 0], [1, 9, 99, 999, 9999, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _lora_model(tiny_model_dir, tok, dtype="fp32", only=True):
    lora = LoraConfig(r=4, alpha=8, only_optimize_lora=only)
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype=dtype, lora=lora), tokenizer=tok)
    torch.manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float()


def test_only_adapters_train(tiny_model_dir, tok):
    model = _lora_model(tiny_model_dir, tok)
    assert isinstance(model, PeftModel) and any(True for _ in lora_layers(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("embed_tokens" in n for n in frozen)
    # 2 layers x 4 projections x (A, B)
    assert len(trainable) == 2 * 4 * 2


def test_full_training_with_lora_keeps_base_trainable(tiny_model_dir, tok):
    model = _lora_model(tiny_model_dir, tok, only=False)
    assert all(p.requires_grad for p in model.parameters())


def test_plain_model_is_not_lora(tiny_model_dir, tok):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, dtype="fp32"), tokenizer=tok)
    assert not any(True for _ in lora_layers(model))
    assert merge_lora_for_save(model) is model


def test_merge_for_save_is_plain_and_matches(tiny_model_dir, tok):
    model = _lora_model(tiny_model_dir, tok)
    before = {n: p.clone() for n, p in model.named_parameters()}
    expected = _logits(model)
    merged = merge_lora_for_save(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)
    # the training model is untouched: still LoRA, same parameters, not merged
    assert any(True for _ in lora_layers(model)) and not any(layer.merged for layer in lora_layers(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_merge_for_save_while_merged_does_not_double_merge(tiny_model_dir, tok):
    model = _lora_model(tiny_model_dir, tok)
    expected = _logits(model)
    model.merge_adapter()  # merged in place by someone else
    merged = merge_lora_for_save(model)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)


def test_merge_lora_state_dict_matches_peft_merge(tiny_model_dir, tok):
    model = _lora_model(tiny_model_dir, tok)
    assert lora_scaling(model) == 8 / 4
    merged_sd = merge_lora_state_dict(model.state_dict(), lora_scaling(model))
    reference = merge_lora_for_save(model).state_dict()
    assert set(merged_sd) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(merged_sd[k], v, rtol=1e-5, atol=1e-6)


def test_plain_model_looks_through_engine_chatrl_and_peft_wrappers(tiny_model_dir, tok) -> None:
    """`plain_model`: the transformers model under a DeepSpeed-like `.module`, an `hf_model` holder and peft."""
    peft_model = _lora_model(tiny_model_dir, tok)
    model = peft_model.get_base_model()

    class Holder(torch.nn.Module):  # a TokenValueModel / ILQL model: the HF model as `hf_model`
        def __init__(self, inner):
            super().__init__()
            self.hf_model = inner

    class Engine(torch.nn.Module):  # a DeepSpeed engine / DDP: the model as `module`
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert isinstance(peft_model, PeftModel) and not isinstance(model, PeftModel)
    assert plain_model(Engine(Holder(peft_model))) is model
    assert plain_model(Engine(model)) is model
    assert plain_model(model) is model
