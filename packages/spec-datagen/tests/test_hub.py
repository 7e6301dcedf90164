"""`--data hf:...`: Hub datasets by id, preset or local directory in the Hub's layout, streamed. No network
here: every test reads a tiny directory in the Hub's layout (Parquet files + README.md with `configs:`), the
same code path as a Hub id, with the Hub switched off."""

import os
import subprocess
import sys

import pytest

from spec_datagen.conversations import read_conversations
from spec_datagen.heldout import HeldOut, prompt_texts
from spec_datagen.hub import PRESETS, list_presets, resolve
from spec_datagen.pipeline import Stats, tokenized_samples
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test.parquet
- config_name: sharegpt
  data_files:
  - split: train
    path: sharegpt/train.parquet
---
# A tiny chat set
"""


def chat(i: int, prefix: str = "train") -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{prefix} question number {i} about topic {i * 7 % 13}"},
            {"role": "assistant", "content": f"answer {i}"},
        ],
        "id": i,
    }


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_parquet(path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub_dir(tmp_path):
    """ORG/NAME in the Hub's layout: a default config of two Parquet files + a test split in JSONL, and a
    `sharegpt` config whose column is named `turns`."""
    root = tmp_path / "hub" / "org" / "chats"
    (root / "data").mkdir(parents=True)
    (root / "sharegpt").mkdir()
    (root / "README.md").write_text(README)
    for part, rows in enumerate([range(0, 30), range(30, 60)]):
        write_parquet(root / "data" / f"train-{part}.parquet", [chat(i) for i in rows])
    write_parquet(root / "data" / "test.parquet", [chat(i, "test") for i in range(5)])
    sharegpt = [
        {"turns": [{"from": "human", "value": f"share {i}"}, {"from": "gpt", "value": f"reply {i}"}]}
        for i in range(4)
    ]
    write_parquet(root / "sharegpt" / "train.parquet", sharegpt)
    return root


def users(source) -> list[str]:
    return [c.messages[0].content for c in read_conversations(source)]


def test_a_local_directory_loads_like_a_hub_id(hub_dir):
    train = users(f"hf:{hub_dir}")
    assert train == [f"train question number {i} about topic {i * 7 % 13}" for i in range(60)]
    hub = resolve(f"hf:{hub_dir}::test")
    assert (hub.config, hub.split, hub.revision) == ("default", "test", None)
    assert users([hub]) == [f"test question number {i} about topic {i * 7 % 13}" for i in range(5)]
    # One part after the id: the split when no config has that name, else the config.
    assert users(f"hf:{hub_dir}:test") == users([hub])
    assert resolve(f"hf:{hub_dir}:sharegpt").config == "sharegpt"
    # Rows are located as SOURCE:ROW; extra columns are kept.
    first = next(iter(read_conversations(f"hf:{hub_dir}")))
    assert first.source == f"hf:{hub_dir}:1" and first.extra == {"id": 0}
    assert resolve(f"hf:{hub_dir}").manifest_entry().dataset_id == str(hub_dir)


def test_a_seed_shuffles_the_same_way_every_time(hub_dir, monkeypatch):
    import datasets

    # datasets sleeps 5 s after a shuffled read of several Parquet files (an Arrow shutdown workaround).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    a = users([resolve(f"hf:{hub_dir}", seed=1)])
    assert a == users([resolve(f"hf:{hub_dir}", seed=1)])
    assert a != users([resolve(f"hf:{hub_dir}", seed=2)])
    assert sorted(a) == sorted(users(f"hf:{hub_dir}")) and a != users(f"hf:{hub_dir}")


def test_a_preset_names_its_column_and_layout(hub_dir, monkeypatch):
    from spec_datagen import hub

    # A preset whose dataset lives under $SPEC_HUB_DIR/ORG/NAME (a local mirror) and whose conversation
    # is in the sharegpt layout under a column of its own name.
    monkeypatch.setitem(
        PRESETS,
        "tiny",
        hub.Preset(id="org/chats", config="sharegpt", split="train", field="turns", layout="sharegpt"),
    )
    monkeypatch.setenv("SPEC_HUB_DIR", str(hub_dir.parent.parent))
    convs = list(read_conversations("hf:tiny"))
    assert [(m.role, m.content) for m in convs[1].messages] == [("user", "share 1"), ("assistant", "reply 1")]
    entry = resolve("hf:tiny").manifest_entry()
    assert (entry.source, entry.dataset_id, entry.config, entry.split) == (
        "hf:tiny",
        "org/chats",
        "sharegpt",
        "train",
    )
    assert any(
        line.startswith("ultrachat_200k ") and "HuggingFaceH4/ultrachat_200k" in line
        for line in list_presets()
    )
    # The preset's column missing from the data is one line naming it.
    monkeypatch.setitem(
        PRESETS, "tiny", hub.Preset(id="org/chats", split="train", field="turns", layout="sharegpt")
    )
    with pytest.raises(
        SpecError,
        match=r"^hf:tiny: the preset's column 'turns' is not in org/chats \(columns: \['id', 'messages'\]\)",
    ):
        list(read_conversations("hf:tiny"))


@pytest.mark.parametrize(
    "source, message",
    [
        ("{d}:default:validation", r"^hf:{d}:default:validation: Bad split: validation. Available splits: \['train', 'test'\]; name one"),
        ("{d}:nope:train", r"^hf:{d}:nope:train: BuilderConfig 'nope' not found. Available: \['default', 'sharegpt'\]"),
        ("ultrachat", r"^hf:ultrachat: 'ultrachat' is neither ORG/NAME nor a preset \(ultrachat_200k, sharegpt"),
        ("a/b:c:d:e", r"^hf:a/b:c:d:e: expected hf:ORG/NAME\[:CONFIG\]\[:SPLIT\]"),
    ],
)  # fmt: skip
def test_bad_sources_are_one_line(hub_dir, source, message):
    with pytest.raises(SpecError, match=message.format(d=hub_dir)):
        resolve("hf:" + source.format(d=hub_dir))


def test_an_id_not_cached_offline_is_one_line():
    # A process of its own: huggingface_hub reads HF_HUB_OFFLINE when imported, as in a user's `spec` run
    # (set later, in this process, it would try the network and time out).
    code = "from spec_datagen.hub import resolve\nresolve('hf:someorg/absent')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert (
        "SpecError: hf:someorg/absent: 'someorg/absent' cannot be resolved offline (HF_HUB_OFFLINE"
        in proc.stderr
    )


def test_without_the_datasets_package_hf_sources_say_how_to_install_it(hub_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(
        SpecError,
        match=r"^hf:\S+: reading Hub datasets needs the `datasets` package: pip install 'spec-datagen\[datasets\]'$",
    ):
        list(read_conversations(f"hf:{hub_dir}"))


def test_a_loading_script_or_missing_column_is_refused(hub_dir, tmp_path):
    script = tmp_path / "scripted"
    script.mkdir()
    (script / "scripted.py").write_text("raise SystemExit('dataset code ran')\n")
    with pytest.raises(SpecError, match=r"is a dataset loading script, and spec never runs dataset code"):
        resolve(f"hf:{script}")
    write_parquet(hub_dir / "sharegpt" / "train.parquet", [{"text": "plain"}])
    with pytest.raises(
        SpecError,
        match=r"no conversation column: expected 'messages', 'conversations' or 'prompt', found \['text'\]",
    ):
        list(read_conversations(f"hf:{hub_dir}:sharegpt"))  # fmt: skip


def test_held_out_prompts_are_dropped_and_counted(hub_dir, demo_model):
    # Rows 3 and 40 restate evaluation prompts of the built-in chat set (lightly edited); the rest are far.
    held = prompt_texts(["chat"])
    rows = [chat(i) for i in range(50)]
    rows[3]["messages"][0]["content"] = held[0].rstrip(".") + "!"
    rows[40]["messages"][0]["content"] = "  " + held[5].upper()
    stats = Stats()
    renderer = ChatRenderer.for_model(demo_model)
    kept = list(
        tokenized_samples(rows, renderer, max_len=256, stats=stats, held_out=HeldOut(held), report=None)
    )
    assert stats.held_out == [3, 40] and stats.skipped == {"held_out": 2}
    assert [s.source_index for s in kept] == [i for i in range(50) if i not in (3, 40)]


def test_datagen_lists_presets_without_a_target(spec_cli):
    done = subprocess.run([spec_cli, "datagen", "--list-presets"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert names == list(PRESETS)


@pytest.mark.parametrize("command", ["datagen", "regenerate"])
def test_a_bad_hub_source_stops_before_the_engine(command, hub_dir, tiny_model, tmp_path, spec_cli):
    import os

    log = tmp_path / "engine-starts.log"
    argv = [spec_cli, command, str(tiny_model("llama")), "--data", f"hf:{hub_dir}::validation",
            "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "SPEC_ENGINE_LOG": str(log)}
    )
    assert done.returncode == 1 and not log.exists()
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: hf:{hub_dir}::validation: Bad split: validation.")
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_datagen_from_a_hub_directory_records_where_rows_came_from(hub_dir, tiny_model, tmp_path, spec_cli):
    """spec datagen --data hf:DIR --max-samples --seed: the manifest names the source, config, split, seed
    and the held-out rows dropped; the same command gives the same rows."""
    from spec_format.dataset import Dataset

    test = hub_dir / "data" / "test.parquet"
    rows = [chat(i) for i in range(12)]
    write_parquet(test, rows)
    # The ids the seeded stream gives first (the shuffle depends on the seed and the files, not on the text);
    # the third of them is made an evaluation prompt, to be dropped.
    order = [c.extra["id"] for c in read_conversations([resolve(f"hf:{hub_dir}:test", seed=5)])][:8]
    rows[order[2]]["messages"][0]["content"] = prompt_texts(["chat"])[0]
    write_parquet(test, rows)
    out = tmp_path / "ds"
    argv = [spec_cli, "datagen", str(tiny_model("llama")), "--data", f"hf:{hub_dir}:test", "--out", str(out),
            "--max-len", "64", "--max-samples", "8", "--seed", "5", "--held-out", "chat", "--no-progress"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ds = Dataset(out)
    (src,) = ds.manifest.data.sources
    assert (src.source, src.dataset_id, src.config, src.split, src.seed) == (
        f"hf:{hub_dir}:test",
        str(hub_dir),
        "default",
        "test",
        5,
    )
    assert ds.manifest.data.max_samples == 8 and ds.manifest.data.held_out == ["chat"]
    assert ds.manifest.data.held_out_dropped == 1 and ds.manifest.num_samples == 7
    # Stream positions 0..7 less the dropped one; each sample's text is its row's.
    assert sorted(ds.source_indices.tolist()) == [0, 1, 3, 4, 5, 6, 7]
    done = subprocess.run([spec_cli, "validate", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
