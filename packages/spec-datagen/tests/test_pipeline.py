"""Row selection and policies of the datagen pipeline (no engine needed: the tokenized stream)."""

import json

import pytest

from spec_datagen.pipeline import Stats, bytes_per_token, check_disk, tokenized_samples
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError


@pytest.fixture(scope="module")
def renderer(demo_model):
    return ChatRenderer.for_model(demo_model)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(i, words=3):
    return {
        "messages": [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": " ".join(["w"] * words)},
        ]
    }


def test_shards_split_the_input_deterministically_and_completely(tmp_path, renderer):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(10)])
    everything = [s.source_index for s in tokenized_samples(data, renderer, max_len=512)]
    assert everything == list(range(10))
    parts = [[s.source_index for s in tokenized_samples(data, renderer, max_len=512, shard_index=k, num_shards=3)]
             for k in range(3)]  # fmt: skip
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(SpecError, match="--shard-index 3 must be in 0..2"):
        next(tokenized_samples(data, renderer, max_len=512, shard_index=3, num_shards=3))


def test_start_and_max_rows_select_by_input_row(tmp_path, renderer):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(10)])
    got = [s.source_index for s in tokenized_samples(data, renderer, max_len=512, start=4)]
    assert got == [4, 5, 6, 7, 8, 9]
    # max_rows counts the job's share from the beginning, so a resumed job stops where a fresh one would.
    got = [
        s.source_index
        for s in tokenized_samples(data, renderer, max_len=512, num_shards=2, max_rows=3, start=2)
    ]
    assert got == [2, 4]


def test_broken_rows_are_reported_by_line_or_stop_the_run(tmp_path, renderer):
    data = write_jsonl(
        tmp_path / "d.jsonl", [chat(0), "{oops", {"messages": [{"role": "bot", "content": "x"}]}, chat(3)]
    )
    reports, stats = [], Stats()
    got = list(tokenized_samples(data, renderer, max_len=512, stats=stats, report=reports.append))
    # Row indices are positions in the input, broken rows included, so they do not shift.
    assert [s.source_index for s in got] == [0, 3]
    assert reports[0].startswith(f"{data}:2: not valid JSON")
    assert reports[1].startswith(f"{data}:3: messages[0].role is 'bot'")
    assert stats.skipped == {"malformed": 2} and stats.rows == 4
    with pytest.raises(SpecError, match=rf"^{data}:2: not valid JSON.*--on-error fail"):
        list(tokenized_samples(data, renderer, max_len=512, on_error="fail", report=None))


def test_long_samples_are_truncated_or_skipped_and_counted(tmp_path, renderer):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            chat(0, words=2),
            chat(1, words=200),
            {"messages": [{"role": "user", "content": "only a question"}]},
        ],
    )
    stats = Stats()
    got = list(tokenized_samples(data, renderer, max_len=64, stats=stats, report=None))
    assert [len(s.token_ids) for s in got][1] == 64 and got[1].loss_mask.any()
    assert stats.truncated == 1 and stats.skipped == {"no_supervised_tokens": 1}
    stats = Stats()
    got = list(tokenized_samples(data, renderer, max_len=64, long="skip", stats=stats, report=None))
    assert [s.source_index for s in got] == [0]
    assert stats.skipped == {"too_long": 1, "no_supervised_tokens": 1} and stats.truncated == 0


def test_truncation_that_leaves_no_assistant_token_skips_the_sample(tmp_path, renderer):
    long_question = {
        "messages": [{"role": "user", "content": "w " * 200}, {"role": "assistant", "content": "a"}]
    }
    stats = Stats()
    assert list(tokenized_samples([long_question], renderer, max_len=32, stats=stats)) == []
    assert stats.skipped == {"no_supervised_tokens": 1} and stats.truncated == 1


def test_in_memory_rows_and_datasets_objects_are_sources(renderer):
    datasets = pytest.importorskip("datasets")
    rows = [chat(i) for i in range(3)]
    from_list = [s.token_ids.tolist() for s in tokenized_samples(rows, renderer, max_len=512)]
    from_ds = [
        s.token_ids.tolist()
        for s in tokenized_samples(datasets.Dataset.from_list(rows), renderer, max_len=512)
    ]
    assert from_list == from_ds and len(from_list) == 3


def test_cost_estimate_and_disk_check(tmp_path):
    assert bytes_per_token(4, 576, "bf16") == 4 * 576 * 2 + 5
    assert bytes_per_token(4, 576, "fp8") == 4 * 576 + 5
    assert check_disk(tmp_path / "new" / "dir", 1, force=False) > 0
    with pytest.raises(SpecError, match=r"needs about .* but only .* is free there; .* or pass --force"):
        check_disk(tmp_path, 1 << 60, force=False)
    assert check_disk(tmp_path, 1 << 60, force=True) > 0


class _NoEngine:
    """A Capturer stand-in for write_dataset: the real renderer and layers, no vLLM engine."""

    def __init__(self, demo_model, start):
        from spec_format.fingerprint import read_model_config

        self.model, self.config = demo_model, read_model_config(demo_model)
        self.layer_ids, self.hidden_size = [2, 15, 30], self.config["hidden_size"]
        self.renderer = ChatRenderer.for_model(demo_model)
        self.start = start

    def tokenized(self, source, **kw):
        return tokenized_samples(source, self.renderer, max_len=512, **kw)


def test_a_failed_engine_start_leaves_no_empty_dataset_behind(tmp_path, demo_model):
    """The engine fails to start (after the writer opened the directory): no dataset that validates
    stays behind; a directory that held committed samples before is kept."""
    from spec_datagen.pipeline import write_dataset

    def start():
        raise SpecError("the engine would not start")

    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(3)])
    with pytest.raises(SpecError, match="would not start"):
        write_dataset(_NoEngine(demo_model, start), data, tmp_path / "out", report=None, progress=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_captured_states_are_skipped_and_counted(tmp_path, demo_model, monkeypatch):
    """A sample whose captured states hold NaN/Inf is not written: counted as skipped, named by its input
    row; the others are kept (docs/reliability.md)."""
    import numpy as np

    from spec_datagen import pipeline
    from spec_datagen.capture import CapturedSample
    from spec_format.dataset import Dataset, validate_dataset

    def fake_capture(_llm, samples, **_kw):
        for s in samples:
            hidden = np.ones((len(s.token_ids), 3, 576), np.float32)
            if s.source_index == 1:
                hidden[3, 1, 7] = np.nan
            yield CapturedSample(s.source_index, s.token_ids, s.loss_mask, hidden)

    monkeypatch.setattr(pipeline, "capture", fake_capture)
    cap = _NoEngine(demo_model, lambda: None)
    cap.samples = pipeline.Capturer.samples.__get__(cap)
    cap.llm = None
    said = []
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(3)])
    summary = pipeline.write_dataset(cap, data, tmp_path / "out", report=said.append, progress=False)
    assert summary.stats.skipped == {"non_finite_states": 1} and summary.stats.samples == 2
    assert "input row 1: the target's hidden states hold NaN/Inf; skipped" in said
    assert Dataset(tmp_path / "out").source_indices.tolist() == [0, 2]
    assert validate_dataset(tmp_path / "out", deep=True) == []


def test_max_len_up_to_the_context_and_one_line_above_it(demo_model):
    """--max-len 8192 on SmolLM2 (its context): the capture engine gets max_model_len 8193 (the prompt plus
    the sampled token) with model_max_length raised to allow it; 8193 is refused before any engine."""
    from spec_datagen.pipeline import Capturer

    with pytest.raises(SpecError) as e:
        Capturer(demo_model, max_len=8193)
    assert str(e.value) == (
        f"--max-len 8193 is longer than the target's context: max_position_embeddings is 8192 in "
        f"{demo_model / 'config.json'}; pass --max-len 8192 or less"
    )
    kw = Capturer(demo_model, max_len=8192)._engine_kwargs
    assert kw["max_model_len"] == 8193 and kw["hf_overrides"] == {"model_max_length": 8193}
    assert "hf_overrides" not in Capturer(demo_model, max_len=2048)._engine_kwargs
