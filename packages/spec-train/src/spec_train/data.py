"""Training data: split, pack, shuffle, distribute and load a spec-format dataset.

A *row* is one micro-batch: whole samples (documents) packed one after another up to `batch_tokens`
tokens, each document restarting its position ids at 0 (spec_models.ttt finds documents that way).
Longer samples are cut to the budget; train.py says at the start how many and what share of the
supervised tokens that drops (cut_report). Rows are built from numpy (the dataset store) and become tensors
only in `load_row`.

Order is a pure function of (seed, epoch): epoch e shuffles the training samples with
numpy.random.default_rng([seed, e]) and packs them in that order (next-fit). The rows of all epochs
form one stream; optimiser step s consumes global rows [s*G, (s+1)*G) with G = world_size * grad_accum,
rank r taking rows s*G + r*A ... s*G + r*A + A - 1. Resuming at step s therefore needs no state but s,
and two processes with accumulation A see exactly the rows of one process with accumulation 2A.
Noise on the hidden states and the random slots of P-EAGLE and DFlash (slot_uniforms) are drawn from
generators seeded by (seed, global row), so they too are the same whatever the world size and after a resume.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from spec_format.dataset import Dataset
from spec_format.errors import SpecError
from spec_format.fingerprint import fingerprint_model_dir


class Split:
    """Training and validation sample indices (disjoint, chosen by seed)."""

    def __init__(self, train: np.ndarray, val: np.ndarray):
        self.train, self.val = train, val


def split_samples(num_samples: int, val_fraction: float, max_val: int, seed: int) -> Split:
    """Hold out ceil(val_fraction * n) samples (at most max_val, at least 1 when val_fraction > 0 and
    n >= 2); a single-sample dataset trains without validation."""
    if num_samples == 0:
        raise SpecError("the dataset holds no samples: nothing to train on")
    n_val = (
        0
        if val_fraction == 0 or num_samples < 2
        else min(max(1, math.ceil(val_fraction * num_samples)), max_val)
    )
    perm = np.random.default_rng([seed, 0x5EED]).permutation(num_samples)
    return Split(np.sort(perm[n_val:]), np.sort(perm[:n_val]))


def training_split(cfg, num_samples: int) -> Split:
    """The run's split: validation as split_samples holds it out, training cut to --max-train-samples."""
    split = split_samples(num_samples, cfg.val_fraction, cfg.max_val_samples, cfg.seed)
    if cfg.max_train_samples is not None:
        split.train = split.train[: cfg.max_train_samples]
    return split


def supervised_token_counts(ds, samples: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: how often each id is a supervised token in these samples of a dataset (the
    manifest's token_frequencies counts every sample)."""
    ids = [np.zeros(0, dtype=np.int64)]
    for i in samples.tolist():
        k, j = ds.locate(i)
        shard = ds.shard(k)
        ids.append(shard.array(j, "token_ids")[shard.array(j, "loss_mask")])
    return np.bincount(np.concatenate(ids), minlength=vocab_size).astype(np.int64)


def pack(order: np.ndarray, lengths: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-fit packing of samples `order` (in that order) into rows of at most `budget` tokens.
    Returns (row_starts int64 [rows + 1], offsets into `order`; kept lengths int64 [len(order)])."""
    kept = np.minimum(lengths[order], budget)
    starts, used = [0], 0
    for i, n in enumerate(kept):
        if used + n > budget:
            starts.append(i)
            used = 0
        used += n
    if len(order):
        starts.append(len(order))
    return np.asarray(starts, dtype=np.int64), kept


def cut_report(ds, samples: np.ndarray, budget: int) -> str | None:
    """One line on the samples of `ds` (a Dataset or online.OnlineData) longer than `budget`: how many,
    the supervised tokens past the budget that never train, and the --batch-tokens that keeps them.
    None when every sample fits."""
    lengths = ds.lengths[samples]
    cut = samples[lengths > budget]
    if not len(cut):
        return None
    mask = (lambda i: ds.samples[i].loss_mask) if hasattr(ds, "samples") else (lambda i: ds.raw(i).loss_mask)
    lost = sum(int(mask(i)[budget:].sum()) for i in cut.tolist())
    total = int(ds.supervised_lengths[samples].sum())
    keep = -(-int(lengths.max()) // 128) * 128
    return (
        f"warning: {len(cut)} of {len(samples)} training samples are longer than --batch-tokens {budget} and "
        f"are cut to it: {lost} of {total} supervised tokens ({lost / max(total, 1):.1%}) never train; "
        f"--batch-tokens {keep} keeps every sample whole (longest: {int(lengths.max())} tokens)"
    )


class Rows:
    """The packed rows of one list of samples in one order: row i holds samples order[starts[i]:starts[i+1]]."""

    def __init__(self, order: np.ndarray, lengths: np.ndarray, budget: int):
        self.order = order
        self.starts, self.kept = pack(order, lengths, budget)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def row(self, i: int) -> list[tuple[int, int]]:
        """[(sample index, tokens kept), ...] of row i."""
        a, b = self.starts[i], self.starts[i + 1]
        return list(zip(self.order[a:b].tolist(), self.kept[a:b].tolist()))

    def tokens(self) -> int:
        return int(self.kept.sum())


class Stream:
    """Global row r -> (epoch, row within the epoch): the epochs' rows one after another."""

    def __init__(self, samples: np.ndarray, lengths: np.ndarray, budget: int, seed: int):
        self.samples, self.lengths, self.budget, self.seed = samples, lengths, budget, seed
        self._bounds = [0]  # global index of each epoch's first row

    @lru_cache(maxsize=4)  # noqa: B019 - one Stream per run; epochs are revisited in order
    def epoch(self, e: int) -> Rows:
        order = self.samples[np.random.default_rng([self.seed, e]).permutation(len(self.samples))]
        return Rows(order, self.lengths, self.budget)

    def epoch_start(self, e: int) -> int:
        while len(self._bounds) <= e:
            self._bounds.append(self._bounds[-1] + len(self.epoch(len(self._bounds) - 1)))
        return self._bounds[e]

    def locate(self, r: int) -> tuple[int, int]:
        e = 0
        while self.epoch_start(e + 1) <= r:
            e += 1
        return e, r - self.epoch_start(e)

    def row(self, r: int) -> list[tuple[int, int]]:
        e, i = self.locate(r)
        return self.epoch(e).row(i)

    def rows_for_epochs(self, epochs: float) -> int:
        """Global rows in the first `epochs` epochs (a fraction counts that share of the last one)."""
        whole = int(epochs)
        return self.epoch_start(whole) + int(round((epochs - whole) * len(self.epoch(whole))))


def step_rows(step: int, rank: int, world: int, accum: int) -> range:
    """Global rows of this rank's micro-batches at optimiser step `step`."""
    first = step * world * accum + rank * accum
    return range(first, first + accum)


def supervised_slots(loss_mask: torch.Tensor, position_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """bool [S, T]: (j, t) counts in the loss iff x_{t+2+j} is supervised and in slot t's document.

    Step j at slot t predicts x_{t+2+j} (spec_models.ttt); positions rise by one inside a document and
    restart at 0, so t+2+j is in t's document iff its position is position[t] + 2 + j.
    loss_mask [T] bool, position_ids [T] -> [S, T].
    """
    T = loss_mask.shape[0]
    out = torch.zeros(steps, T, dtype=torch.bool, device=loss_mask.device)
    for j in range(steps):
        n = T - 2 - j
        if n > 0:
            out[j, :n] = loss_mask[2 + j :] & (position_ids[2 + j :] == position_ids[:n] + 2 + j)
    return out


def slot_uniforms(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[T] uniforms for a row's random slots (P-EAGLE's COD slots, DFlash's anchors): the training rows'
    own (RowLoader.load: seeded by (seed, global row), so two ranks draw what one process with twice the
    accumulation draws and a missing gradient all-reduce shows); evaluation rows draw from torch's."""
    if "uniforms" in batch:
        return batch["uniforms"]
    return torch.rand(batch["loss_mask"].shape[0], device=batch["loss_mask"].device)


def layer_indices(ds: Dataset, aux_ids: list[int] | None, verifier_dir: str | Path) -> tuple[list[int], int]:
    """Check that `ds` was captured from the verifier in `verifier_dir` with the layers a draft needs, and
    return (positions of `aux_ids` in the dataset's layers, position of the last layer L). The last layer
    (capture id L = num_hidden_layers, before the final norm) gives the targets; aux_ids default to
    all the dataset's other layers, in its order."""
    info = fingerprint_model_dir(verifier_dir)
    m = ds.manifest
    mismatch = m.target.mismatches(info)
    if mismatch:
        raise SpecError(
            f"{ds.path}: captured from another target than the verifier {verifier_dir} ({'; '.join(mismatch)} "
            "[dataset != verifier]); train against the model the dataset was captured from"
        )
    L = info.num_hidden_layers
    if L not in m.layer_ids:
        raise SpecError(
            f"{ds.path}: layers {m.layer_ids} lack capture id {L}, the verifier's last layer before its final "
            "norm, which the training targets come from; capture the dataset with it (spec datagen's default)"
        )
    aux_ids = [k for k in m.layer_ids if k != L] if aux_ids is None else aux_ids
    missing = [k for k in aux_ids if k not in m.layer_ids]
    if missing or not aux_ids:
        raise SpecError(
            f"{ds.path}: layers {m.layer_ids} lack the draft's auxiliary layers {missing or aux_ids}; "
            "capture them, or start a draft that reads the captured ones"
        )
    return [m.layer_ids.index(k) for k in aux_ids], m.layer_ids.index(L)


def row_pad_multiple(device: torch.device, dtype: torch.dtype) -> int | None:
    """RowLoader's pad_multiple for training in `dtype` on `device`: CPU bf16 (AMX) kernels are compiled
    per matrix shape, so rows are padded to a few lengths there; elsewhere padding is only waste."""
    return 128 if device.type == "cpu" and dtype == torch.bfloat16 else None


class RowLoader:
    """Builds the tensors of rows of a dataset. hidden[:, aux_idx] (in the draft's aux-layer order) are the
    fc inputs; hidden[:, last_idx] is the verifier's last layer before its final norm. With all_positions
    every position is in the loss mask (training with --loss-mask all; evaluation keeps the dataset's).
    With pad_multiple, a row ends in a padding document (zeros, outside the loss mask) up to a multiple of
    that many tokens: rows then come in a few shapes, which CPU bf16 kernels need (oneDNN compiles a kernel
    for each new matrix shape, and rows of every length made bf16 slower than fp32)."""

    def __init__(
        self, path: str | Path, aux_idx: list[int], last_idx: int, noise: float = 0.0, seed: int = 0,
        dataset: Dataset | None = None, all_positions: bool = False, pad_multiple: int | None = None,
    ):  # fmt: skip
        self.path, self.aux_idx, self.last_idx, self.noise, self.seed = path, aux_idx, last_idx, noise, seed
        self._ds, self.all_positions, self.pad_multiple = dataset, all_positions, pad_multiple

    @property
    def ds(self) -> Dataset:
        if self._ds is None:  # opened lazily: each data-loader worker maps the shards itself
            self._ds = Dataset(self.path)
        return self._ds

    def _hidden(self, i: int, n: int) -> torch.Tensor:
        """float32 [n, n_layers, H] of sample i's first n tokens (bf16 is widened here, not in numpy)."""
        ds = self.ds
        if ds.manifest.dtype == "bf16":
            return torch.from_numpy(ds.raw(i).hidden[:n].copy()).view(torch.bfloat16).float()
        return torch.from_numpy(np.array(ds[i].hidden[:n], dtype=np.float32))

    def load(self, row: list[tuple[int, int]], noise_key: int | None = None) -> dict[str, torch.Tensor]:
        """{"input_ids" [T] int64, "loss_mask" [T] bool, "position_ids" [T] int64, "aux" [T, n_aux*H],
        "last" [T, H]} for one packed row. With noise_key (a training row's global index) also
        "uniforms" [T] (slot_uniforms), and noise_key seeds the noise: both from (seed, global row)."""
        ids, mask, pos, hid = [], [], [], []
        for i, n in row:
            raw = self.ds.raw(i)
            ids.append(torch.from_numpy(raw.token_ids[:n].astype(np.int64)))
            mask.append(self._mask(raw.loss_mask[:n]))
            pos.append(torch.arange(n))
            hid.append(self._hidden(i, n))
        h = torch.cat(hid)
        aux = h[:, self.aux_idx].reshape(h.shape[0], -1)
        if self.noise and noise_key is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + noise_key)
            aux = aux + (torch.rand(aux.shape, generator=gen) * 2 - 1) * self.noise
        last = h[:, self.last_idx]
        pad = (-h.shape[0]) % self.pad_multiple if self.pad_multiple else 0
        if pad:  # a document of its own (positions from 0), never supervised
            ids.append(torch.zeros(pad, dtype=torch.int64))
            mask.append(torch.zeros(pad, dtype=torch.bool))
            pos.append(torch.arange(pad))
            aux = torch.cat([aux, aux.new_zeros(pad, aux.shape[1])])
            last = torch.cat([last, last.new_zeros(pad, last.shape[1])])
        out = {
            "input_ids": torch.cat(ids),
            "loss_mask": torch.cat(mask),
            "position_ids": torch.cat(pos),
            "aux": aux,
            "last": last.contiguous(),
        }
        if noise_key is not None:  # drawn here, not in the forward: the row's index needs no host sync
            seed = self.seed * 1_000_003 + noise_key + (1 << 48)  # not the noise's stream
            out["uniforms"] = torch.rand(aux.shape[0], generator=torch.Generator().manual_seed(seed))
        return out

    def token_view(self, row: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_mask [T], position_ids [T]) of a row, without reading hidden states."""
        mask = [self._mask(self.ds.raw(i).loss_mask[:n]) for i, n in row]
        return torch.cat(mask), torch.cat([torch.arange(n) for _, n in row])

    def _mask(self, loss_mask: np.ndarray) -> torch.Tensor:
        if self.all_positions:
            return torch.ones(len(loss_mask), dtype=torch.bool)
        return torch.from_numpy(loss_mask.copy())


class StreamDataset(torch.utils.data.Dataset):
    """Map-style view of the training stream for torch's DataLoader: item r = global row r."""

    def __init__(self, stream: Stream, loader: RowLoader):
        self.stream, self.loader = stream, loader

    def __len__(self) -> int:  # unbounded stream; the sampler decides what is read
        return 1 << 62

    def __getitem__(self, r: int) -> dict[str, torch.Tensor]:
        return self.loader.load(self.stream.row(r), noise_key=r)


def train_batches(
    stream: Stream, loader: RowLoader, start_step: int, end_step: int, rank: int, world: int, accum: int,
    num_workers: int,
):  # fmt: skip
    """Iterator over this rank's rows for steps [start_step, end_step), in order (A per step)."""
    order = [r for s in range(start_step, end_step) for r in step_rows(s, rank, world, accum)]
    return iter(
        torch.utils.data.DataLoader(
            StreamDataset(stream, loader),
            sampler=order,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=2 if num_workers else None,
            persistent_workers=False,
            # Its own generator: creating the iterator otherwise draws a worker seed from torch's global
            # one, which a resume has just restored, and shifts every random draw of the steps after it.
            generator=torch.Generator().manual_seed(0),
        )
    )
