"""Atomic writes: a failed write leaves nothing, and a killed writer's temporary is cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest

from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, write_json


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert list(target.parent.iterdir()) == []


def test_a_killed_writers_temporary_goes_at_the_next_write(tmp_path: Path) -> None:
    leftover = tmp_path / ".metrics.json.tmp-99999"  # what SIGKILL leaves behind
    leftover.write_text('{"half')
    other = tmp_path / ".other.json.tmp-99999"
    other.write_text("{}")
    write_json(tmp_path / "metrics.json", {"nmse": 0.1})
    assert read_json(tmp_path / "metrics.json", "metrics") == {"nmse": 0.1}
    assert not leftover.exists() and other.exists()


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="cfg.json"):
        read_json(tmp_path / "cfg.json", "settings file")
