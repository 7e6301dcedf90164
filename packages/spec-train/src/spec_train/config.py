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
from typing import Annotated, Literal

import msgspec

from spec_format.errors import SpecError

CONFIG_FILE = "train_config.json"


# Defaults computed from the run (the fields below say where they apply).
DEFAULT_DRAFT_VOCAB = 32768  # draft vocabulary: min(this, the target's)
CHECKPOINTS_PER_RUN = 5  # --save-every: this many checkpoints over the run
WARMUP_SHARE = 0.05  # --warmup-steps: this share of the steps (at least 1)


def Help(text: str) -> msgspec.Meta:
    """A field's help: `spec train --help` shows it with the field's default (spec_train.cli)."""
    return msgspec.Meta(description=text)


# fmt: off
class TrainConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # --- what to train on and against
    dataset: str | None = None  # the DATASET argument; absent with --online
    verifier: Annotated[str | None, Help("The target model's HF directory the dataset was captured from (its norm, lm_head and embeddings are read); default with --online: that target.")] = None
    out: Annotated[str, Help("Run directory (checkpoints/, final/, best/, metrics).")]
    verifier_name: Annotated[str | None, Help("Target name recorded in the draft, which vLLM loads (e.g. a hub id); default: the --verifier path.")] = None
    algorithm: Annotated[str, Help("The draft to train (registered in spec_train.algorithms).")] = "eagle3"
    init_from: Annotated[str | None, Help("Fine-tune this draft directory instead of starting from the verifier.")] = None
    # Online training (spec_train.online): capture with vLLM while training, spec datagen's settings.
    online: Annotated[str | None, Help("Capture the hidden states from this target (HF directory) with vLLM while training, instead of reading DATASET (spec_train.online).")] = None
    data: Annotated[list[str] | None, Help("With --online: conversation files in any spec datagen layout, or hf: datasets (repeatable).")] = None
    cache: Annotated[str | None, Help("With --online: also write what is captured as a dataset here; later epochs (and later runs) read it.")] = None
    max_len: Annotated[int, Help("With --online: longest sample in tokens (spec datagen --max-len).")] = 2048
    long: Annotated[Literal["truncate", "skip"], Help("With --online: samples longer than --max-len (spec datagen --long).")] = "truncate"
    on_error: Annotated[Literal["skip", "fail"], Help("With --online: rows that cannot be rendered are reported as FILE:LINE and skipped, or stop the run.")] = "skip"

    # --- draft model
    num_layers: Annotated[int, Help("Draft decoder layers.")] = 1
    layer_init: Annotated[Literal["verifier", "random"], Help(
        "Start the draft's layers as the verifier's layers after its deepest aux layer, with fc passing that "
        "state through (spec_models.eagle3._layers_from_verifier), or from N(0, 0.02).")] = "verifier"
    layer_type: Annotated[Literal["llama", "qwen3"] | None, Help("Draft layer family; default: the verifier's.")] = None
    ttt_steps: Annotated[int, Help("TTT depth, written as the draft's k (speculative_tokens, vLLM's default).")] = 3
    draft_vocab_size: Annotated[int | None, Help(f"Draft vocabulary; default: min({DEFAULT_DRAFT_VOCAB}, the target's).")] = None
    # EAGLE-3 norm variants vLLM serves (docs/algorithms/eagle3.md).
    norm_before_residual: Annotated[bool, Help("EAGLE-3 variant: RMSNorm on the residual stream entering layer 0.")] = False
    norm_before_fc: Annotated[bool, Help("EAGLE-3 variant: RMSNorm over the concatenated aux states before fc.")] = False
    fc_norm: Annotated[bool, Help("EAGLE-3 variant: RMSNorm on each aux layer's state before fc.")] = False
    norm_output: Annotated[bool, Help("EAGLE-3 variant: pass the normed state to the next step.")] = False
    train_lm_head: Annotated[bool, Help("Train the draft's lm_head (else keep the verifier's rows frozen).")] = True
    # P-EAGLE (spec_train.peagle): the token fed at drafted positions after the first, and COD sampling:
    # depth d >= 1 keeps a random max(cod_ratio**d, cod_min) of the slots (each a subset of depth d-1's).
    mask_token_id: Annotated[int | None, Help(
        "P-EAGLE: the token read at drafted positions after the first (default: the verifier's pad/unk token); "
        "DFlash: the token whose embedding fills masked slots (default: the tokenizer's mask token, else its "
        "last spare special token).")] = None
    cod_ratio: Annotated[float, Help("P-EAGLE COD sampling: depth d keeps max(cod_ratio**d, cod_min) of the slots.")] = 0.7
    cod_min: Annotated[float, Help("P-EAGLE COD sampling: the floor of the kept share per depth.")] = 0.2
    # DFlash (spec_train.dflash): blocks sampled per packed row (each the anchor + ttt_steps masked slots).
    max_anchors: Annotated[int, Help("DFlash: blocks (anchor + ttt_steps masked slots) sampled per packed row.")] = 64

    # --- objective
    loss: Annotated[Literal["kl", "ce", "lk"], Help(
        "Forward KL to the verifier, CE on its top-1 token, or lk: -log sum_v min(p_v, q_v), the draft's "
        "acceptance probability under sampling optimised directly (an LK-style loss).")] = "kl"
    step_weights: Annotated[list[float] | None, Help(
        "Loss weight per TTT step, comma-separated, normalised to sum to 1; default: 0.8**j.")] = None
    position_weights: Annotated[Literal["decay", "dpace"] | None, Help(
        "How the drafted depths share the loss: decay: fixed --step-weights; dpace: D-PACE, per draft chain "
        "from the draft's own confidence q in the verifier's top-1 token, depth j weighted "
        "sum_{m>=j} prod_{i<=m} ((1-a) q_i + a) with a = --dpace-alpha (one more pass over the head). "
        "Default: dpace for --algorithm dflash, decay otherwise and with --step-weights (docs/training.md).")] = None
    dpace_alpha: Annotated[float, Help("D-PACE smoothing a in (0, 1] (1: fixed weights in proportion to the depths at and after j).")] = 0.5
    loss_chunk: Annotated[int, Help("Tokens per chunk of the [tokens x draft vocabulary] loss.")] = 1024

    # --- data
    batch_tokens: Annotated[int, Help("Tokens per packed row (one micro-batch per process).")] = 2048
    grad_accum: Annotated[int, Help("Micro-batches per optimiser step and process.")] = 1
    epochs: Annotated[float | None, Help("Passes over the training samples; default: 1 unless --max-steps.")] = None
    max_steps: Annotated[int | None, Help("Optimiser steps (runs across epochs); wins over --epochs.")] = None
    val_fraction: Annotated[float, Help("Share of samples held out for validation.")] = 0.05
    max_val_samples: Annotated[int, Help("At most this many validation samples.")] = 256
    max_train_samples: Annotated[int | None, Help(
        "Train on the first N training samples only (dataset order; the validation split stays that of the "
        "whole dataset): data-scaling studies and quick trials on part of a dataset.")] = None
    noise: Annotated[float, Help("Uniform noise U(-x, x) on the auxiliary hidden states.")] = 0.0
    loss_mask: Annotated[Literal["dataset", "all"], Help(
        "Positions trained on: the dataset's loss mask (assistant turns) or all; the target is the verifier's "
        "distribution at each, so prompts the target wrote (spec synth) teach too. Validation uses the "
        "dataset's mask.")] = "dataset"
    seed: int = 0

    # --- optimiser and schedule (AdamW, fp32 master weights and state)
    lr: Annotated[float, Help("Peak learning rate.")] = 1e-3
    min_lr_ratio: Annotated[float, Help("Cosine floor as a share of --lr.")] = 0.1
    warmup_steps: Annotated[int | None, Help(f"Linear warmup steps; default: {WARMUP_SHARE:.0%} of the steps (at least 1).")] = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)  # config file only
    grad_clip: Annotated[float, Help("Max gradient norm, 0 = off.")] = 1.0

    # --- compute
    dtype: Annotated[Literal["auto", "fp32", "bf16"], Help(
        "Compute precision (weights and optimiser state stay fp32); auto: bf16 on GPUs and CPUs with AMX, "
        "else fp32.")] = "auto"
    attn: Annotated[Literal["auto", "sdpa", "flex", "blockwise"], Help(
        "Training attention: sdpa (a dense mask over every TTT step's keys), flex (block-sparse, GPUs), "
        "blockwise (CPU: causal flash attention per document plus the diagonal keys, exact; cost T^2/2, not "
        "S*T^2) or auto (blockwise on CPUs from 1024-token rows, else sdpa).")] = "auto"
    gradient_checkpointing: Annotated[bool, Help(
        "Recompute each draft layer's activations in the backward instead of keeping them (multi-layer "
        "drafts, long rows, GPU memory): slower, same gradients.")] = False
    fsdp: Annotated[bool, Help("FSDP2 (fully_shard) instead of DDP when several processes run.")] = False
    world_size: int = 1  # filled in at start-up from torchrun's environment (no flag)

    # --- run-time (may change on --resume)
    resume: Annotated[bool, Help("Continue from the last complete checkpoint in --out.")] = False
    eval_every: Annotated[int | None, Help("Evaluate every N steps; default: --save-every.")] = None
    save_every: Annotated[int | None, Help(f"Checkpoint every N steps; default: {CHECKPOINTS_PER_RUN} checkpoints over the run.")] = None
    keep_last: Annotated[int, Help("Checkpoints kept (final/ and best/ are kept apart).")] = 3
    log_every: int = 1
    max_eval_rows: Annotated[int, Help("Packed rows evaluated per split (also the train-acceptance sample).")] = 64
    save_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    num_workers: Annotated[int, Help("Data-loader processes (offline only).")] = 0
    online_queue: Annotated[int, Help("With --online: captured samples held between capture and training.")] = 16
    samples_per_shard: Annotated[int, Help("With --cache: samples per shard of the cache.")] = 256
    tensorboard: Annotated[bool, Help("Also log to RUN/tensorboard (needs the tensorboard package).")] = False
    progress: bool = True
# fmt: on


# Fields that may differ between a run and its resumption (they do not change the weights).
RUNTIME_FIELDS = frozenset(
    {"out", "resume", "eval_every", "save_every", "keep_last", "log_every", "save_dtype", "num_workers",
     "tensorboard", "progress", "max_eval_rows", "online_queue", "samples_per_shard", "gradient_checkpointing",
     "attn"}
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
    if cfg.online is not None and cfg.verifier is None:
        cfg = msgspec.structs.replace(cfg, verifier=cfg.online)
    return cfg


def check(cfg: TrainConfig) -> None:
    """Values that are wrong whatever the data: one line naming the setting."""
    positive = ("num_layers", "ttt_steps", "max_anchors", "loss_chunk", "batch_tokens", "grad_accum", "keep_last",
                "log_every", "max_val_samples", "max_eval_rows", "online_queue", "samples_per_shard", "max_len")  # fmt: skip
    for name in positive:
        if getattr(cfg, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "save_every", "eval_every", "draft_vocab_size", "max_train_samples"):
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
    from spec_train.algorithms import get_algorithm

    get_algorithm(cfg.algorithm)  # an unknown name: a SpecError naming the known ones
    if not 0 < cfg.dpace_alpha <= 1:
        raise SpecError(f"--dpace-alpha must be in (0, 1], not {cfg.dpace_alpha}")
    if position_weights(cfg) == "dpace" and cfg.step_weights is not None:
        raise SpecError("--step-weights are the fixed weights of --position-weights decay; drop one of them")
    if cfg.step_weights is not None and (
        len(cfg.step_weights) != cfg.ttt_steps or min(cfg.step_weights) < 0 or sum(cfg.step_weights) <= 0
    ):
        raise SpecError(
            f"--step-weights: give {cfg.ttt_steps} non-negative weights (one per TTT step), not all zero"
        )
    if not (0 < cfg.cod_ratio <= 1 and 0 <= cfg.cod_min <= 1):
        raise SpecError(
            f"--cod-ratio must be in (0, 1] and --cod-min in [0, 1], got {cfg.cod_ratio}, {cfg.cod_min}"
        )
    if (cfg.dataset is None) == (cfg.online is None):
        raise SpecError("give a DATASET to train on, or --online TARGET --data CONVERSATIONS (not both)")
    if cfg.online is not None and not cfg.data:
        raise SpecError("--online needs --data CONVERSATIONS (the rows to capture)")
    if cfg.online is None and (cfg.data or cfg.cache):
        raise SpecError(f"--{'data' if cfg.data else 'cache'} needs --online TARGET")
    if cfg.online is None and cfg.verifier is None:
        raise SpecError("--verifier is required: the target model's directory the dataset was captured from")
    if cfg.online is not None and cfg.max_train_samples is not None:
        raise SpecError("--max-train-samples: online training captures every row of --data; pass fewer rows")
    if cfg.online is not None and cfg.num_workers:
        raise SpecError("--num-workers: online training reads the capture process's queue; use 0")
    if cfg.batch_tokens < 4:
        raise SpecError("--batch-tokens must be at least 4 (a row must hold a token and what it predicts)")


def position_weights(cfg: TrainConfig) -> str:
    """How the depths share the loss (--position-weights): fixed weights with --step-weights, else the
    algorithm's default (spec_train.algorithms.Algorithm.position_weights: D-PACE for DFlash, where it
    raised held-out acceptance on the quick start's data, docs/algorithms/dflash.md)."""
    from spec_train.algorithms import get_algorithm

    if cfg.position_weights is not None:
        return cfg.position_weights
    return "decay" if cfg.step_weights is not None else get_algorithm(cfg.algorithm).position_weights


def default(name: str):
    """A TrainConfig field's default, for callers without a run's config (tests, benchmarks): the struct
    stays the one place a default is written."""
    return next(f.default for f in msgspec.structs.fields(TrainConfig) if f.name == name)


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
