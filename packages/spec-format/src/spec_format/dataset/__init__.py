"""The hidden-state dataset store: a directory of shards plus manifest.json, readable with numpy alone.

    from spec_format.dataset import DatasetWriter, Dataset, Sample, DatasetManifest, merge_datasets

    with DatasetWriter(out_dir, target=target, layer_ids=[2, 15, 27, 30], hidden_size=576,
                       dtype="bf16", resume=True, command="spec datagen ...") as w:
        for i in range(w.next_source_index, len(rows)):      # rows already stored are skipped
            w.add(source_index=i, token_ids=ids, loss_mask=mask, hidden=hidden)   # hidden [T, 4, 576]
    ds = Dataset(out_dir); ds[0].hidden; ds.lengths; ds.token_frequencies(); ds.verify()

docs/dataset-format.md describes the on-disk layout, the storage options with measurements, and the
resume / lock / multi-job / merge semantics.
"""

from spec_format.dataset.check import describe_dataset, validate_dataset
from spec_format.dataset.encoding import (
    decode_fp8,
    e4m3_to_float32,
    encode_fp8,
    float32_to_e4m3,
)
from spec_format.dataset.manifest import (
    DataInfo,
    DatasetManifest,
    DataSource,
    ExtraSpec,
    ShardInfo,
    TokenCounts,
)
from spec_format.dataset.merge import merge_datasets
from spec_format.dataset.reader import Dataset, RawSample, Sample
from spec_format.dataset.writer import DatasetWriter

__all__ = [
    "Dataset",
    "DataInfo",
    "DataSource",
    "DatasetManifest",
    "DatasetWriter",
    "ExtraSpec",
    "RawSample",
    "Sample",
    "ShardInfo",
    "TokenCounts",
    "decode_fp8",
    "describe_dataset",
    "e4m3_to_float32",
    "encode_fp8",
    "float32_to_e4m3",
    "merge_datasets",
    "validate_dataset",
]
