"""`chatrl data inspect` and `chatrl data prepare` through the real CLI entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

from chatrl.cli import main
from chatrl.data.commands import histogram

FIX = Path(__file__).parent / "fixtures" / "data"


def test_inspect_builtin_file(capsys, tiny_model_dir):
    assert main(["data", "inspect", "builtin:hh-rlhf-harmless", "--tokenizer", tiny_model_dir]) == 0
    out = capsys.readouterr().out
    assert "hh" in out and "1800" in out
    assert re.search(r"empty_reply\s*│\s*4", out) and re.search(r"bad_transcript\s*│\s*2", out)
    bins = [int(m) for m in re.findall(r"^\s+\d+-\d+\s+(\d+) ", out, flags=re.M)]
    kept = int(re.search(r"│ hh\s+│ 1800\s+│ (\d+)", out).group(1))
    assert len(bins) == 10 and sum(bins) == kept  # histogram covers every kept row


def test_inspect_bad_file_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{broken\n')
    assert main(["data", "inspect", str(bad), "--tokenizer", "none"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err and "Traceback" not in err
    assert main(["data", "inspect", str(bad), "--tokenizer", "none", "--skip-bad-rows"]) == 0
    assert re.search(r"bad_json\s*│\s*1", capsys.readouterr().out)


def test_prepare_writes_shards_and_report(tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data:\n  paths: ['{FIX / 'preference.jsonl'}', '{FIX / 'hh.jsonl'}']\n  eval_fraction: 0.0\n")
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(out), "data.split=1,1,1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["split"] == "1,1,1" and report["kept"][str(FIX / "hh.jsonl")] == 3
    total = 0
    for step in ("sft", "reward", "rlhf"):
        for part in ("train", "eval"):
            lines = (out / f"{step}_{part}.jsonl").read_text().splitlines()
            assert len(lines) == report["shards"].get(f"{step}/{part}", 0)
            total += len(lines)
    assert total == 7
    pair = json.loads((out / "reward_train.jsonl").read_text().splitlines()[0])
    assert set(pair) == {"prompt_messages", "chosen", "rejected", "margin", "source"}


def test_histogram_bins_cover_range():
    assert histogram([1, 2, 3, 10], bins=3) == [(1, 4, 3), (5, 8, 0), (9, 12, 1)]
    assert sum(c for _, _, c in histogram(list(range(37)))) == 37
