"""hs_connector's coupling to vLLM's private connector code, checked against the installed vLLM without an
engine: a vLLM upgrade that renames what the CPU override reads fails here, by name."""

from dataclasses import dataclass

import pytest

from spec_datagen import hs_connector
from spec_format.errors import SpecError


def test_installed_vllm_has_everything_the_connector_reads():
    assert hs_connector.coupling_problems() == []


def test_a_renamed_attribute_method_or_field_is_named():
    stock = hs_connector.ExampleHiddenStatesConnector

    class Upgraded(stock):  # what a vLLM that moved things around might ship
        def __init__(self):
            self._kv_cache = None
            self._blocksize = 16  # renamed

        @staticmethod
        def _write_tensors(tensors, event, path, lock_fd):  # a parameter renamed
            pass

        def get_finished(self, finished_req_ids):  # no longer calls the override
            return None, None

    @dataclass
    class Pending:
        req_id: str
        filename: str
        token_ids: object

    problems = hs_connector.coupling_problems(Upgraded, Pending)
    text = "; ".join(problems)
    for name in ("self._block_size", "self._lock_fds", "self._executor", "_write_tensors(", "get_finished"):
        assert name in text, (name, text)
    assert "PendingSave.block_ids" in problems and not any("_kv_cache" in p for p in problems)


def test_the_message_names_the_version_it_was_written_against():
    with pytest.raises(
        SpecError, match=r"written against vLLM 0\.32\.0 and needs X, which the installed vLLM"
    ):
        raise hs_connector._outdated("X")
