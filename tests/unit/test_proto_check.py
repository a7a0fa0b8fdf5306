"""`make proto-check` passes on the committed code and fails once a .proto changes unregenerated."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__py*"))
    return tmp_path


def _proto_check(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "proto-check"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_committed_code_is_fresh(repo_copy: Path) -> None:
    result = _proto_check(repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_edit_without_regeneration_fails(repo_copy: Path) -> None:
    proto = repo_copy / "protos/fraud/v1/transaction.proto"
    proto.write_text(
        proto.read_text().replace(
            "map<string, string> attributes = 15;",
            "map<string, string> attributes = 15;\n  string loyalty_id = 16;",
        )
    )
    result = _proto_check(repo_copy)
    assert result.returncode != 0
    assert "stale generated code: protos/fraud/v1/transaction_pb2" in result.stdout
