"""paths.atomic_write / atomic_path: the file appears whole or not at all, and no temp file is left behind."""

import json

import pytest

from chatrl.paths import atomic_path, atomic_write, atomic_write_json


def test_atomic_write_text_bytes_and_json(tmp_path):
    assert atomic_write(tmp_path / "sub" / "a.txt", "é\n").read_text(encoding="utf-8") == "é\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "c.json", {"k": "é"}, ensure_ascii=False)
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"k": "é"}
    assert "é" in (tmp_path / "c.json").read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
