"""Deterministic, disjoint splits per dataset and weighted blending."""

from __future__ import annotations

import json

import pytest

from chatrl.config import DataConfig
from chatrl.data.prepare import load_all_records, load_records
from chatrl.data.split import blend, eval_size, parse_split, shard_bounds, split_dataset
from chatrl.errors import ChatrlError


def test_parse_split_and_bounds():
    assert parse_split("2,4,4") == [0.2, 0.4, 0.4]
    assert shard_bounds(10, [0.2, 0.4, 0.4]) == [(0, 2), (2, 6), (6, 10)]
    assert shard_bounds(7, [1.0, 0.0, 0.0]) == [(0, 7), (7, 7), (7, 7)]
    for bad in ("2,4", "a,b,c", "0,0,0", "-1,1,1"):
        with pytest.raises(ChatrlError, match="data.split"):
            parse_split(bad)


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(100))
    a = split_dataset(items, "ds", "2,4,4", 0.1, seed=7)
    b = split_dataset(items, "ds", "2,4,4", 0.1, seed=7)
    assert a == b
    parts = [set(v) for v in a.values()]
    assert sum(len(p) for p in parts) == 100 and set().union(*parts) == set(items)
    sizes = {k: len(v) for k, v in a.items()}
    assert sizes == {("sft", "train"): 18, ("sft", "eval"): 2, ("reward", "train"): 36, ("reward", "eval"): 4,
                     ("rlhf", "train"): 36, ("rlhf", "eval"): 4}
    c = split_dataset(items, "ds", "2,4,4", 0.1, seed=8)
    assert c[("sft", "train")] != a[("sft", "train")]  # the seed matters


def test_a_files_split_does_not_depend_on_its_folder(tmp_path):
    """The split is seeded by the file's own name: the same file in two folders (another checkout, pytest's numbered
    temporary folders) gives the same shards; another name gives another shuffle."""
    rows = [json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) for i in range(60)]
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    paths = [tmp_path / "a" / "pairs.jsonl", tmp_path / "b" / "pairs.jsonl", tmp_path / "c" / "other.jsonl"]
    for path in paths:
        path.write_text("\n".join(rows) + "\n")

    def prompts(path, part):
        records, _ = load_records(DataConfig(paths=[str(path)], split="0,1,0", eval_fraction=0.2), "reward", part)
        return [r.prompt_messages[-1]["content"] for r in records]

    assert prompts(paths[0], "train") == prompts(paths[1], "train")
    assert prompts(paths[0], "eval") == prompts(paths[1], "eval") and len(prompts(paths[0], "eval")) == 12
    assert prompts(paths[0], "train") != prompts(paths[2], "train")


def test_eval_size_rules():
    assert eval_size(100, 0.05) == 5
    assert eval_size(10, 0.01) == 1  # at least one eval row when asked for
    assert eval_size(1, 0.5) == 0  # never the whole shard
    assert eval_size(50, 0.0) == 0


def _write(path, n, tag):
    path.write_text("".join(json.dumps({"prompt": f"{tag} q{i}", "response": f"{tag} a{i}"}) + "\n"
                            for i in range(n)))


def test_split_of_a_dataset_does_not_depend_on_other_datasets(tmp_path):
    _write(tmp_path / "a.jsonl", 40, "a")
    _write(tmp_path / "b.jsonl", 30, "b")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    alone, _ = load_records(DataConfig(paths=[a], split="1,1,1"), "rlhf", "eval")
    both, _ = load_records(DataConfig(paths=[b, a], split="1,1,1"), "rlhf", "eval")
    from_a = [p.messages for p in both if p.messages[0]["content"].startswith("a ")]
    assert from_a == [p.messages for p in alone]


def test_all_shards_are_disjoint_across_steps(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards, report = load_all_records(DataConfig(paths=[str(tmp_path / "p.jsonl")], split="2,4,4"))
    prompt_of = {"sft": lambda r: r.messages[0]["content"], "reward": lambda r: r.prompt_messages[0]["content"],
                 "rlhf": lambda r: r.messages[0]["content"]}
    keys = {name: {prompt_of[name.split("_")[0]](r) for r in recs} for name, recs in shards.items()}
    names = list(keys)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not keys[x] & keys[y], (x, y)
    assert set().union(*keys.values()) == {f"q{i}" for i in range(60)}
    assert {k: len(v) for k, v in shards.items()} == {"sft_train": 11, "sft_eval": 1, "reward_train": 23,
                                                       "reward_eval": 1, "rlhf_train": 23, "rlhf_eval": 1}
    assert report.shards["sft/train"] == 11


def test_shards_a_step_cannot_use_are_empty_with_a_note(tmp_path):
    _write(tmp_path / "a.jsonl", 60, "a")
    shards, report = load_all_records(DataConfig(paths=[str(tmp_path / "a.jsonl")], split="2,4,4"))
    assert shards["reward_train"] == [] and len(shards["sft_train"]) == 11
    assert any("reward step needs preference pairs" in n for n in report.notes)


def test_blend_counts_follow_round_w_times_n():
    x, y = list(range(10)), list(range(100, 104))
    out = blend([("x", x), ("y", y)], [0.5, 2.0], seed=1)
    assert len(out) == 5 + 8
    assert sorted(v for v in out if v >= 100) == sorted(y * 2)
    assert len({v for v in out if v < 100}) == 5
    assert out == blend([("x", x), ("y", y)], [0.5, 2.0], seed=1)
    assert blend([("x", x)], [], seed=1) == x  # no weights: everything, once
    with pytest.raises(ChatrlError, match="data.weights has 1 values but data.paths has 2"):
        blend([("x", x), ("y", y)], [1.0], seed=1)


def test_weights_in_config_blend_train_but_not_eval(tmp_path):
    _write(tmp_path / "a.jsonl", 40, "a")
    _write(tmp_path / "b.jsonl", 40, "b")
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    base = dict(paths=paths, split="1,0,0", eval_fraction=0.25)
    train, _ = load_records(DataConfig(**base, weights=[1.0, 0.5]), "sft", "train")
    n_a = sum(c.messages[0]["content"].startswith("a ") for c in train)
    assert (n_a, len(train) - n_a) == (30, 15)
    ev, _ = load_records(DataConfig(**base, weights=[1.0, 0.5]), "sft", "eval")
    assert len(ev) == 20


def test_reward_shards_give_a_judge_pairs_the_reward_model_never_saw(tmp_path):
    """data.reward_shards=[sft, rlhf]: the judge's training pairs are exactly the sft and rlhf shards' train pairs,
    disjoint from the reward model's (reward shard) and from every held-out part; held-out pairs stay the reward
    shard's."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"})
                              for i in range(100)) + "\n")
    rm_cfg = DataConfig(paths=[str(path)], split="2,4,4", eval_fraction=0.1)
    judge_cfg = DataConfig(paths=[str(path)], split="2,4,4", eval_fraction=0.1, reward_shards=["sft", "rlhf"])
    prompts = lambda recs: {r.prompt_messages[-1]["content"] for r in recs}  # noqa: E731
    judge = prompts(load_records(judge_cfg, "reward", "train")[0])
    everything, _ = load_all_records(rm_cfg)
    held_out = {r.messages[-1]["content"] for r in everything["rlhf_eval"]} | prompts(everything["reward_eval"])
    assert len(judge) == 18 + 36  # the sft and rlhf train parts of 100 pairs split 2,4,4 with 10% held out
    sft_prompts = {[m for m in r.messages if m["role"] == "user"][-1]["content"] for r in everything["sft_train"]}
    assert judge == sft_prompts | {r.messages[-1]["content"] for r in everything["rlhf_train"]}
    assert not judge & prompts(everything["reward_train"]) and not judge & held_out
    assert prompts(load_records(judge_cfg, "reward", "eval")[0]) == prompts(everything["reward_eval"])
    with pytest.raises(ChatrlError, match="data.reward_shards"):
        load_records(DataConfig(paths=[str(path)], reward_shards=["judge"]), "reward", "train")
