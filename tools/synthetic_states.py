"""Synthetic samples with the statistics that matter for storage: heavy-tailed residual-stream values whose
scale grows with depth, per-channel offsets and scales, and a few "massive activation" channels near
25,000 (as SmolLM2-135M has at layers 15 and 27). For tools/bench_dataset.py; real data compresses
differently (see docs/dataset-format.md)."""

from __future__ import annotations

import numpy as np

OUTLIER = 25_000.0


def synthetic_hidden(
    rng: np.random.Generator, num_tokens: int, num_layers: int, hidden_size: int
) -> np.ndarray:
    """float32 [T, n_layers, H]."""
    shape = (num_tokens, num_layers, hidden_size)
    # Gaussian scale mixture (log-normal scales): heavy tails like real residual streams.
    x = rng.standard_normal(shape, dtype=np.float32) * np.exp(
        rng.standard_normal(shape, dtype=np.float32) * 0.6
    )
    layer_scale = np.float32(0.5) * np.float32(4.0) ** np.linspace(0, 1, num_layers, dtype=np.float32)
    chan_rng = np.random.default_rng(1234)  # channel structure is a property of the "model": fixed
    chan_scale = np.exp(chan_rng.standard_normal(hidden_size) * 0.5).astype(np.float32)
    chan_offset = (chan_rng.standard_normal(hidden_size) * 0.3).astype(np.float32)
    x = (x * chan_scale + chan_offset) * layer_scale[:, None]
    outliers = chan_rng.choice(hidden_size, size=min(2, hidden_size), replace=False)
    deep = (
        slice(1, None) if num_layers > 1 else slice(0, 1)
    )  # massive activations appear after the first layers
    hit = rng.random(num_tokens) < 0.03
    hit[0] = True  # the first token carries them in real models
    for c in outliers:
        x[:, deep, c] *= 20  # the outlier channels are large everywhere ...
        x[hit, deep, c] = np.float32(OUTLIER) * rng.uniform(0.6, 1.0, (int(hit.sum()), 1)).astype(np.float32)
    return x


def synthetic_sample(
    rng: np.random.Generator, num_tokens: int, num_layers: int, hidden_size: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token_ids int32 [T] Zipf-like, loss_mask bool [T] with the prompt unsupervised, hidden [T, L, H])."""
    token_ids = ((rng.zipf(1.2, num_tokens) - 1) % vocab_size).astype(np.int32)
    loss_mask = np.arange(num_tokens) >= int(num_tokens * rng.uniform(0.1, 0.5))
    return token_ids, loss_mask, synthetic_hidden(rng, num_tokens, num_layers, hidden_size)
