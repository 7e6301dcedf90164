"""The training configuration: one msgspec struct, resolved as defaults <- config file <- command-line flags,
and saved as RUN/train_config.json.

Fields split in two groups. Everything that decides the trajectory of the weights (data, model, optimiser,
schedule, seed, world size) must be the same when a run is resumed: `identity()` holds those, and a run
directory whose saved config differs in one of them is refused, naming the field. The rest (where to log,
how often to save, progress bars) may change between an interrupted run and its resumption.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from spec_format.errors import SpecError

CONFIG_FILE = "train_config.json"


class TrainConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # --- what to train on and against
    dataset: str
    verifier: str  # the verifier's HF model directory (norm, lm_head, embeddings are read from it)
    out: str  # the run directory
    verifier_name: str | None = None  # name vLLM loads as the target (default: the verifier directory)
    algorithm: str = "eagle3"  # spec_train.algorithms: eagle3, peagle, ...
    init_from: str | None = None  # fine-tune this draft directory instead of starting from the verifier

    # --- draft model
    num_layers: int = 1
    # "verifier": the draft's layers start as the verifier's layers after its deepest aux layer, with fc
    # passing that state through (spec_models.eagle3._layers_from_verifier); "random": N(0, 0.02).
    layer_init: Literal["verifier", "random"] = "verifier"
    layer_type: Literal["llama", "qwen3"] | None = None  # default: from the verifier's family
    ttt_steps: int = 3  # TTT depth; also the checkpoint's speculative_tokens (vLLM's default k)
    draft_vocab_size: int | None = None  # default min(32768, target vocab)
    # EAGLE-3 norm variants vLLM serves (docs/algorithms/eagle3.md): RMSNorm on the fc input (all aux states,
    # or each layer's apart), on the residual stream entering layer 0, on the hidden state passed on.
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    train_lm_head: bool = True  # False: keep the verifier's lm_head rows frozen
    # P-EAGLE (spec_train.peagle): the token fed at drafted positions after the first (default: the
    # verifier's pad/unk token, else the last id), and COD sampling: depth d >= 1 keeps a random
    # max(cod_ratio**d, cod_min) of the slots (each a subset of depth d-1's).
    mask_token_id: int | None = None
    cod_ratio: float = 0.7
    cod_min: float = 0.2
    # DFlash (spec_train.dflash): blocks sampled per packed row (each the anchor + ttt_steps masked slots).
    max_anchors: int = 64

    # --- objective
    loss: Literal["kl", "ce"] = "kl"  # forward KL to the verifier, or CE on the verifier's top-1 token
    step_weights: list[float] | None = None  # per TTT step; default 0.8**j; normalised to sum to 1
    loss_chunk: int = 1024  # tokens per chunk of the [tokens x draft_vocab] loss

    # --- data
    batch_tokens: int = 2048  # token budget of one packed row (one micro-batch per rank)
    grad_accum: int = 1  # micro-batches per optimiser step and rank
    epochs: float | None = None  # default 1 when max_steps is not given
    max_steps: int | None = None  # wins over epochs; runs across epochs
    val_fraction: float = 0.05
    max_val_samples: int = 256
    noise: float = 0.0  # uniform noise U(-noise, noise) added to the auxiliary hidden states
    # Training positions: the dataset's loss mask (assistant turns), or all. The loss target is the
    # verifier's own distribution at each position, so prompts the target wrote itself (spec synth) teach
    # too. Validation always counts the dataset's mask.
    loss_mask: Literal["dataset", "all"] = "dataset"
    seed: int = 0

    # --- optimiser and schedule (AdamW, fp32 master weights and state)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # default 5% of the steps (at least 1)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    # --- compute
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # autocast: auto = bf16 on GPUs and AMX CPUs, else fp32
    attn: Literal["sdpa", "flex"] = "sdpa"
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when several processes run
    world_size: int = 1  # filled in at start-up from torchrun's environment

    # --- run-time (may change on --resume)
    resume: bool = False
    eval_every: int | None = None  # default: save_every
    save_every: int | None = None  # default: 10 checkpoints over the run
    keep_last: int = 3
    log_every: int = 1
    max_eval_rows: int = 64  # packed validation rows evaluated (also the train-acceptance sample)
    save_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    num_workers: int = 0  # data-loader processes
    tensorboard: bool = False
    progress: bool = True


# Fields that may differ between a run and its resumption (they do not change the weights).
RUNTIME_FIELDS = frozenset(
    {"out", "resume", "eval_every", "save_every", "keep_last", "log_every", "save_dtype", "num_workers",
     "tensorboard", "progress", "max_eval_rows"}
)  # fmt: skip


def identity(cfg: TrainConfig) -> dict:
    return {k: v for k, v in msgspec.to_builtins(cfg).items() if k not in RUNTIME_FIELDS}


def read_config_file(path: str | Path) -> dict:
    """Values of a JSON or TOML config file ({field: value}, field names as in TrainConfig; dashes allowed)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: config file not found") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(values, dict):
        raise SpecError(f"{path}: expected a table/object of settings")
    return {k.replace("-", "_"): v for k, v in values.items()}


def resolve(flags: dict, config_file: str | Path | None = None) -> TrainConfig:
    """TrainConfig from a config file's values overridden by `flags` (None = not given)."""
    values = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    source = f"{config_file}" if config_file else "options"
    try:
        cfg = msgspec.convert(values, TrainConfig)
    except msgspec.ValidationError as e:
        raise SpecError(f"{source}: {e}") from None
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    """Values that are wrong whatever the data: one line naming the setting."""
    positive = ("num_layers", "ttt_steps", "max_anchors", "loss_chunk", "batch_tokens", "grad_accum", "keep_last",
                "log_every", "max_val_samples", "max_eval_rows")  # fmt: skip
    for name in positive:
        if getattr(cfg, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "save_every", "eval_every", "draft_vocab_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise SpecError(f"--epochs must be positive, got {cfg.epochs}")
    if not 0 <= cfg.val_fraction < 1:
        raise SpecError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.lr <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise SpecError("--lr must be positive and --min-lr-ratio in [0, 1]")
    if cfg.noise < 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise SpecError("--noise, --grad-clip and --weight-decay must not be negative")
    if cfg.step_weights is not None and (
        len(cfg.step_weights) != cfg.ttt_steps or min(cfg.step_weights) < 0 or sum(cfg.step_weights) <= 0
    ):
        raise SpecError(
            f"--step-weights: give {cfg.ttt_steps} non-negative weights (one per TTT step), not all zero"
        )
    from spec_train.algorithms import ALGORITHMS, BUILTIN

    if cfg.algorithm not in BUILTIN and cfg.algorithm not in ALGORITHMS:
        raise SpecError(
            f"--algorithm {cfg.algorithm}: spec train knows {', '.join(sorted(set(BUILTIN) | set(ALGORITHMS)))}"
        )
    if not (0 < cfg.cod_ratio <= 1 and 0 <= cfg.cod_min <= 1):
        raise SpecError(
            f"--cod-ratio must be in (0, 1] and --cod-min in [0, 1], got {cfg.cod_ratio}, {cfg.cod_min}"
        )
    if cfg.batch_tokens < 4:
        raise SpecError("--batch-tokens must be at least 4 (a row must hold a token and what it predicts)")


def step_weights(cfg: TrainConfig) -> list[float]:
    """Per-TTT-step loss weights, summing to 1 (EAGLE's 0.8**j decay by default)."""
    w = cfg.step_weights or [0.8**j for j in range(cfg.ttt_steps)]
    return [x / sum(w) for x in w]


def save(cfg: TrainConfig, run_dir: Path) -> None:
    from spec_train.state import write_bytes_atomic

    write_bytes_atomic(run_dir / CONFIG_FILE, msgspec.json.format(msgspec.json.encode(cfg), indent=2) + b"\n")


def load(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=TrainConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise SpecError(f"{path}: not a training config this version reads ({e})") from None


def check_same_run(saved: TrainConfig, cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to continue a run directory whose saved config differs in a field that changes the weights."""
    a, b = identity(saved), identity(cfg)
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise SpecError(
            f"{run_dir / CONFIG_FILE}: this run was made with {k}={a[k]!r}, not {b[k]!r}"
            + (f" (and {len(diff) - 1} more differences)" if len(diff) > 1 else "")
            + "; resume with the same settings, or choose another --out"
        )
