"""The small helpers every package shares: file hashes, the diagnostics hooks, comma-separated options."""

import hashlib
import os

import click
import pytest

from spec_format.cli import comma_separated
from spec_format.diagnostics import record_engine_start
from spec_format.files import file_sha256


def test_file_sha256_is_the_sha256_of_the_bytes_across_blocks(tmp_path):
    data = os.urandom((1 << 24) + 123)  # more than one 16 MiB block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_engine_starts_are_logged_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # unset or empty: nothing written (a default file name would land here)
    monkeypatch.delenv("SPEC_ENGINE_LOG", raising=False)
    record_engine_start("llm")
    monkeypatch.setenv("SPEC_ENGINE_LOG", "")
    record_engine_start("llm")
    assert list(tmp_path.iterdir()) == []
    log = tmp_path / "starts.log"
    monkeypatch.setenv("SPEC_ENGINE_LOG", str(log))
    record_engine_start("llm")
    record_engine_start("server")
    assert log.read_text().splitlines() == [f"{os.getpid()} llm", f"{os.getpid()} server"]


def test_comma_separated_lists_and_their_errors():
    ints = comma_separated(int, "2,15")
    assert ints(None, None, "2, 15,27,") == [2, 15, 27] and ints(None, None, None) is None
    with pytest.raises(click.BadParameter, match=r"'2,x': give comma-separated integers, e.g. 2,15"):
        ints(None, None, "2,x")
    assert comma_separated(float, "1,0.8")(None, None, "1,0.5") == [1.0, 0.5]
