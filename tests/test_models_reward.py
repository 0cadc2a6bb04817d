"""Reward model: the end-token rule, padding invariance, equivalence with plain HF scoring, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from chatrl.config import LoraConfig
from chatrl.models.loading import load_tokenizer
from chatrl.models.reward import (
    TokenValueModel,
    end_token_index,
    load_reward_model,
    position_ids_from_mask,
    sequence_scores,
    token_values,
)
from chatrl.models.saving import save_hf_folder

EOS = 2
SEQS = [[1, 40, 41, 42, 43, EOS], [1, 7, 8, 9, 10, 11, 12, 13, 14, EOS], [1, 5, EOS]]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def rm(tiny_model_dir, tok):
    return load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, trainable=False)


def pad_batch(seqs, pad_id, side):
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def test_end_token_index_by_hand():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert end_token_index(right).tolist() == [2, 4, 0]
    assert end_token_index(left).tolist() == [4, 4, 4]
    assert end_token_index(right.bool()).tolist() == [2, 4, 0]


def test_position_ids_from_mask_by_hand():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_new_head_is_deterministic_and_small(tiny_model_dir, tok, rm):
    torch.manual_seed(123)  # global RNG must not matter
    again = load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, trainable=False)
    assert torch.equal(rm.score.weight, again.score.weight)
    assert rm.score.weight.shape == (1, rm.config.hidden_size)
    assert 0 < rm.score.weight.abs().max() < 0.2
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_are_padding_invariant(rm, tok, side):
    ids, mask = pad_batch(SEQS, tok.pad_token_id, side)
    with torch.no_grad():
        batched = sequence_scores(rm, ids, mask)
        alone = torch.cat([sequence_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in SEQS])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert batched.dtype == torch.float32 and batched.shape == (3,)


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_values_zero_at_padding_and_match_alone(rm, tok, side):
    ids, mask = pad_batch(SEQS, tok.pad_token_id, side)
    with torch.no_grad():
        values = token_values(rm, ids, mask)
        alone = token_values(rm, torch.tensor([SEQS[2]]), torch.ones(1, 3, dtype=torch.long))[0]
    assert torch.isfinite(values).all()
    assert (values[mask == 0] == 0).all()
    torch.testing.assert_close(values[2][mask[2].bool()], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(TokenValueModel(rm)(ids, mask), values)


def test_saved_folder_scores_like_plain_transformers(tiny_model_dir, tok, tmp_path):
    rm = load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, trainable=False)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    out = save_hf_folder(TokenValueModel(rm), tok, tmp_path / "rm")
    assert not (out / "generation_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.pad_token_id == tok.pad_token_id
    ids, mask = pad_batch(SEQS, tok.pad_token_id, "right")
    with torch.no_grad():
        hf = plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = sequence_scores(rm, ids, mask)
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-5)
    # loading the reward folder back keeps its trained head
    reloaded = load_reward_model(str(out), dtype="fp32", trainable=False)
    assert torch.equal(reloaded.score.weight, rm.score.weight)


def test_lora_reward_model_trains_adapters_and_head(tiny_model_dir, tok):
    model = load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, lora_cfg=LoraConfig(r=2, alpha=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("score.weight") for n in trainable)
    assert all("lora_" in n or n.endswith("score.weight") for n in trainable)
    ids, mask = pad_batch(SEQS, tok.pad_token_id, "right")
    chosen, rejected = sequence_scores(model, ids, mask)[:2]
    (-torch.nn.functional.logsigmoid(chosen - rejected)).backward()
    head = next(p for n, p in model.named_parameters() if n.endswith("score.weight"))
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_gradient_checkpointed_critic_backprops(tiny_model_dir, tok):
    critic = load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, gradient_checkpointing=True)
    assert critic.training
    ids, mask = pad_batch(SEQS, tok.pad_token_id, "left")
    token_values(critic, ids, mask).sum().backward()
    assert critic.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_trainable_layers_freezes_embeddings_and_lower_blocks(tiny_model_dir, tok):
    model = load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, trainable_layers=1)
    blocks = model.model.layers
    assert len(blocks) == 2
    assert not any(p.requires_grad for p in model.get_input_embeddings().parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert model.score.weight.requires_grad and model.model.norm.weight.requires_grad
    ids = torch.randint(3, 100, (2, 6))
    model(input_ids=ids).logits.sum().backward()
    assert blocks[0].self_attn.q_proj.weight.grad is None  # backward stopped above block 0
    assert blocks[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_trainable_layers_bad_values_are_clear_errors(tiny_model_dir, tok):
    from chatrl.config import RewardConfig
    from chatrl.configbase import load_config
    from chatrl.errors import ChatrlError

    with pytest.raises(ChatrlError, match="only 2 blocks"):
        load_reward_model(tiny_model_dir, dtype="fp32", tokenizer=tok, trainable_layers=3)
    with pytest.raises(ChatrlError, match="cannot be combined with LoRA"):
        load_config(RewardConfig, overrides=["model.trainable_layers=2", "model.lora.r=4"])
