"""Conversations from the Hugging Face Hub by name: `--data hf:ORG/NAME[:CONFIG][:SPLIT]`, or a preset.

    hf:HuggingFaceH4/ultrachat_200k::train_sft   the Hub id, its default config, split train_sft
    hf:ultrachat_200k                            a preset (PRESETS): id, config, split and the column that
                                                 holds the conversation, in one table entry
    hf:/data/ultrachat_200k:default:train_sft    a local directory in the Hub's layout (data files and a
                                                 README.md whose YAML `configs:` names them): the same path
                                                 through `datasets` as a Hub id, for air-gapped machines

With one part after the id, it is the config when the dataset has a config of that name, else the split.
The split defaults to "train". A name is looked up as a local directory, then as ORG/NAME under
$SPEC_HUB_DIR (a local mirror of Hub datasets: presets and ids then load from it, offline), then as a
preset, then on the Hub.

Rows are streamed (`datasets.load_dataset_builder(...).as_streaming_dataset`), so a 200k-row set is never
held whole; `seed` shuffles them reproducibly (the order of the data files, then a buffer of
SHUFFLE_BUFFER rows), so `--max-samples N --seed S` takes the same N rows every time. Dataset loading
scripts never run (datasets >= 4 has none, and nothing here passes trust_remote_code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from spec_format.dataset.manifest import DataSource
from spec_format.errors import SpecError

PREFIX = "hf:"
SHUFFLE_BUFFER = 10_000


class Preset(msgspec.Struct, frozen=True, kw_only=True):
    """A named chat set: where it is on the Hub, and which column holds the conversation in which layout
    (`messages`: [{role, content}], `sharegpt`: [{from, value}], `prompt_completion`: two text columns)."""

    id: str
    split: str
    field: str
    layout: str
    config: str | None = None
    completion: str | None = None  # prompt_completion: the reply's column (`field` holds the prompt)
    about: str = ""


# As published on the Hub (dataset cards), in resources/presets.json; `spec datagen --list-presets` prints them.
PRESETS: dict[str, Preset] = msgspec.json.decode(
    (Path(__file__).parent / "resources" / "presets.json").read_bytes(), type=dict[str, Preset]
)


class HubData(msgspec.Struct, frozen=True, kw_only=True):
    """One `hf:` source resolved: what `datasets` loads and how its rows become conversations."""

    given: str  # as on the command line (rows are located as GIVEN:ROW)
    path: str  # the Hub id, or the local directory datasets reads
    dataset_id: str  # the Hub id (a local directory: its path as given)
    config: str | None
    split: str
    revision: str | None  # the commit datasets resolved (None for a local directory)
    preset: Preset | None = None
    seed: int | None = None

    def manifest_entry(self) -> DataSource:
        return DataSource(
            source=self.given, dataset_id=self.dataset_id, config=self.config, split=self.split,
            revision=self.revision, seed=self.seed,
        )  # fmt: skip

    def rows(self) -> Iterator[tuple[str, Any]]:
        """(GIVEN:ROW, row) in stream order (shuffled by `seed`), rows mapped to a layout datagen reads."""
        ds = _stream(self)
        if self.seed is not None:
            ds = ds.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        for i, row in enumerate(ds):
            if i == 0:
                _check_columns(self, row)
            yield f"{self.given}:{i + 1}", _as_conversation(row, self.preset)


def is_hub(source: Any) -> bool:
    return isinstance(source, HubData) or (isinstance(source, str) and source.startswith(PREFIX))


def list_presets() -> list[str]:
    """One line per preset: name, id, config/split, column and layout."""
    out = []
    for name, p in PRESETS.items():
        column = f"{p.field}+{p.completion}" if p.completion else p.field
        out.append(
            f"{name:<18} hf:{p.id}:{p.config or ''}:{p.split}  column '{column}' ({p.layout}): {p.about}"
        )
    return out


def _datasets(given: str):
    try:
        import datasets
    except ImportError:
        raise SpecError(
            f"{given}: reading Hub datasets needs the `datasets` package: pip install 'spec-datagen[datasets]'"
        ) from None
    return datasets


def _local(name: str) -> Path | None:
    """The local directory `name` names: a path, or ORG/NAME under $SPEC_HUB_DIR."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    mirror = os.environ.get("SPEC_HUB_DIR")
    if mirror and "/" in name and (Path(mirror) / name).is_dir():
        return Path(mirror) / name
    return None


def parse(given: str) -> tuple[str, str | None, str | None, str | None, Preset | None]:
    """hf:NAME[:CONFIG][:SPLIT] -> (id or directory, config, split, a lone part that is either, preset);
    empty parts are None."""
    name, *rest = given[len(PREFIX) :].split(":")
    if not name or len(rest) > 2:
        raise SpecError(f"{given}: expected hf:ORG/NAME[:CONFIG][:SPLIT], a preset name, or hf:DIRECTORY")
    config, split = (rest[0] or None, rest[1] or None) if len(rest) == 2 else (None, None)
    either = rest[0] or None if len(rest) == 1 else None
    if "/" in name or _local(name) is not None:
        return name, config, split, either, None
    if name not in PRESETS:
        raise SpecError(
            f"{given}: '{name}' is neither ORG/NAME nor a preset ({', '.join(PRESETS)}; "
            "spec datagen --list-presets shows them)"
        )
    p = PRESETS[name]
    return p.id, config or p.config, split or either or p.split, None, p


def resolve(given: str | HubData, seed: int | None = None) -> HubData:
    """Resolve an `hf:` source (id, config, split, revision) without reading its rows: every problem
    (no `datasets`, an id unknown offline, an unknown config or split, a loading script) is one SpecError
    line here, before any engine starts."""
    if isinstance(given, HubData):
        return given
    datasets = _datasets(given)
    name, config, split, either, preset = parse(given)
    local = _local(name)
    path = str(local) if local is not None else name
    if either is not None:  # hf:ID:X: X is a config if the dataset has one of that name, else a split
        configs = _call(given, name, datasets.get_dataset_config_names, path)
        config, split = (either, None) if either in configs else (None, either)
    builder = _call(given, name, datasets.load_dataset_builder, path, config)
    hub = HubData(
        given=given, path=path, dataset_id=name, config=builder.config.name, split=split or "train",
        revision=None if local is not None else builder.hash, preset=preset, seed=seed,
    )  # fmt: skip
    _stream(hub, builder)  # an unknown split fails here, before anything is read
    return hub


def _stream(hub: HubData, builder=None):
    datasets = _datasets(hub.given)
    if builder is None:
        builder = _call(hub.given, hub.dataset_id, datasets.load_dataset_builder, hub.path, hub.config,
                        revision=hub.revision)  # fmt: skip
    return _call(hub.given, hub.dataset_id, builder.as_streaming_dataset, split=hub.split)


def _call(given: str, name: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) with `datasets`' errors turned into one line saying what to do."""
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        raise SpecError(
            f"{given}: '{name}' is a dataset loading script, and spec never runs dataset code; use a "
            "revision or copy of it with data files (Parquet/JSON)"
        ) from None
    except ValueError as e:
        text = str(e).splitlines()[0]
        if text.startswith("Bad split"):
            raise SpecError(f"{given}: {text}; name one with hf:{name}:CONFIG:SPLIT") from None
        if "BuilderConfig" in text or "Config name is missing" in text:
            raise SpecError(f"{given}: {text}; name one with hf:{name}:CONFIG[:SPLIT]") from None
        raise SpecError(f"{given}: {text}") from None
    except (ConnectionError, FileNotFoundError) as e:
        if offline:
            raise SpecError(
                f"{given}: '{name}' cannot be resolved offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and "
                "it is not in the datasets cache): fetch it once with network, or pass hf:DIRECTORY of a copy "
                "in the Hub's layout (or set SPEC_HUB_DIR)"
            ) from None
        raise SpecError(
            f"{given}: '{name}' was not found on the Hub or could not be reached ({type(e).__name__}); check "
            "the id, log in for a gated or private set (hf auth login), or pass hf:DIRECTORY of a local copy"
        ) from None


def _check_columns(hub: HubData, row: dict) -> None:
    p = hub.preset
    if p is not None:
        missing = [c for c in (p.field, p.completion) if c and c not in row]
        if missing:
            raise SpecError(
                f"{hub.given}: the preset's column '{missing[0]}' is not in {hub.dataset_id} (columns: "
                f"{sorted(row)}); pass hf:{hub.dataset_id} with a column datagen reads instead"
            )
    elif not {"messages", "conversations", "prompt"} & set(row):
        raise SpecError(
            f"{hub.given}: no conversation column: expected 'messages', 'conversations' or 'prompt', found "
            f"{sorted(row)}; rename the column, or use a preset (spec datagen --list-presets)"
        )


def _as_conversation(row: dict, preset: Preset | None) -> dict:
    """A preset's row with its conversation under the key datagen reads (other columns kept)."""
    if preset is None:
        return row
    # The conversation keys normalise() looks for go, so that only the preset's column is read.
    rest = {k: v for k, v in row.items() if k not in ("messages", "conversations", "prompt", "completion")}
    rest = {k: v for k, v in rest.items() if k not in (preset.field, preset.completion)}
    if preset.layout == "prompt_completion":
        return {**rest, "prompt": row[preset.field], "completion": row[preset.completion]}
    return {**rest, "conversations" if preset.layout == "sharegpt" else "messages": row[preset.field]}
