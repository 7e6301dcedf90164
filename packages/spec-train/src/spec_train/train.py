"""Train a draft from a captured dataset: the whole training loop, top to bottom.

One process (CPU or one GPU):
    spec train DATASET --verifier TARGET_DIR --out RUN --max-steps 200
Several processes on one node (DDP; --fsdp for FSDP2), the same command under torchrun:
    spec train ... --nproc 8          or          torchrun --nproc-per-node 8 -m spec_train DATASET ...
Several nodes: torchrun --nnodes N --node-rank R --master-addr HOST ... -m spec_train ... (RUN on a
filesystem every node sees).
Continue an interrupted run (same settings; a run directory made with other settings is refused):
    spec train ... --resume

Sections: setup -> data -> model -> optimiser -> resume -> loop (train step, log, eval, checkpoint).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import torch

from spec_datagen.hub import is_hub
from spec_format.dataset import Dataset
from spec_format.diagnostics import kill_point
from spec_format.errors import SpecError
from spec_format.model_card import write_card
from spec_train import config as config_mod
from spec_train import distributed, state
from spec_train.algorithms import get_algorithm
from spec_train.config import TrainConfig
from spec_train.data import (
    RowLoader,
    Rows,
    Stream,
    cut_report,
    row_pad_multiple,
    step_rows,
    train_batches,
    training_split,
)
from spec_train.hardware import cpu_has_amx
from spec_train.hardware import describe as describe_hardware
from spec_train.loss import Objective
from spec_train.metrics import MetricsLog, estimate, plot
from spec_train.targets import VerifierHead


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware multiplies bf16 natively: GPUs, and CPUs with AMX (bf16 matmuls
    4-6x fp32's on two Sapphire Rapids cores; 25 training steps 1.52x, docs/training.md). fp32 on other
    CPUs: there bf16 is emulated and slower."""
    if device.type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_amx() else torch.float32


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to lr * min_ratio at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def run_facts(ds, draft) -> dict:
    """What the model card says of the training data (spec_format.model_card): where the rows came from
    (a dataset's `data` record), and the share of supervised tokens the draft vocabulary holds."""
    counts = ds.token_frequencies(ds.manifest.target.vocab_size)  # int64 [target vocab]
    kept = (torch.arange(len(draft.d2t)) + draft.d2t.cpu()).numpy()  # [draft vocab] target ids
    facts = {"draft_vocab_coverage": round(float(counts[kept].sum() / max(1, counts.sum())), 6)}
    data = getattr(ds.manifest, "data", None)
    if data is not None:
        facts["data_sources"] = msgspec.to_builtins(data.sources)
        facts["held_out"], facts["held_out_dropped"] = data.held_out, data.held_out_dropped
    return facts


def _with_provenance(draft, cfg: TrainConfig, step: int, ds: Dataset, facts: dict):
    from spec_format.checkpoint import SpecMetadata

    c = draft.config
    data = (
        {"online": cfg.online, "data": cfg.data}
        if cfg.online
        else {"dataset": str(Path(cfg.dataset).resolve())}
    )
    # The longest context trained on (samples are cut to a row's budget): `spec doctor` compares served
    # contexts with it.
    longest = min(int(ds.lengths.max()), cfg.batch_tokens) if len(ds) else 0
    prov = {"made_by": "spec train", "run": str(Path(cfg.out).resolve()), "step": step, **data,
            "dataset_samples": len(ds), "max_sample_tokens": longest, **facts}  # fmt: skip
    return msgspec.structs.replace(c, spec=msgspec.structs.replace(c.spec or SpecMetadata(), provenance=prov))


# ---------------------------------------------------------------------------------------------
# Run directory.


def prepare_run_dir(cfg: TrainConfig, d: distributed.Dist) -> Path | None:
    """Check RUN against cfg; returns the checkpoint to resume from (None: start fresh)."""
    run = Path(cfg.out)
    saved = run / config_mod.CONFIG_FILE
    if saved.exists():
        if not cfg.resume:
            raise SpecError(
                f"{run}: already holds a training run; pass --resume to continue it, or choose another --out"
            )
        config_mod.check_same_run(config_mod.load(run), cfg, run)
    elif run.exists() and any(run.iterdir()) and not cfg.resume:
        raise SpecError(f"{run}: exists and is not empty; choose another --out")
    distributed.barrier()
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        for p in state.clean_partial(run):
            d.say(f"removed {p.name}, left half-written by an interrupted run")
        config_mod.save(cfg, run)
    distributed.barrier()
    found = state.checkpoints(run)
    if cfg.resume and not found:
        d.say(f"--resume: no complete checkpoint in {run}; starting from step 0")
    return found[-1] if cfg.resume and found else None


# ---------------------------------------------------------------------------------------------
# Evaluation: teacher-forced loss / top-1 agreement on validation rows, simulated acceptance on
# validation rows and on a fixed sample of training rows.


@torch.no_grad()
def evaluate(
    model, rows: list, loader: RowLoader, cfg: TrainConfig, d, dtype, weights, with_loss: bool
) -> dict:
    S = cfg.ttt_steps
    stats = torch.zeros(3, S, device=d.device)
    accepted, reached = torch.zeros(S, device=d.device), torch.zeros(S, device=d.device)
    model.eval()
    # Every rank runs the same number of forwards (FSDP2 gathers weights collectively); a rank past the
    # end re-reads row 0 and drops the result.
    for i in range(d.rank, math.ceil(len(rows) / d.world) * d.world, d.world):
        keep = i < len(rows)
        batch = {k: v.to(d.device) for k, v in loader.load(rows[i if keep else 0]).items()}
        if with_loss:
            stats += model(batch, None, dtype)[1] * keep
        a, r = model(batch, None, dtype, accept_k=S)
        accepted += a * keep
        reached += r * keep
    distributed.all_reduce_sum(stats)
    distributed.all_reduce_sum(accepted)
    distributed.all_reduce_sum(reached)
    model.train()
    est = estimate(accepted.long().tolist(), reached.long().tolist())
    out = {"acceptance": est.per_position, "acceptance_length": est.mean_acceptance_length, "chains": est.n}
    if with_loss:
        per = (stats[0] / stats[2].clamp(min=1)).tolist()
        out.update(loss=sum(w * x for w, x in zip(weights, per)), loss_steps=per,
                   acc_steps=(stats[1] / stats[2].clamp(min=1)).tolist())  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The training run: train() below, and the pieces it calls in order.


def open_data(cfg: TrainConfig, d: distributed.Dist):
    """The dataset, every shard's structure checked now rather than mid-epoch (contents: spec validate
    --deep); online, the rows tokenized, nothing captured yet (spec_train.online)."""
    if cfg.online:
        from spec_train import online

        if d.world > 1 and cfg.cache:
            raise SpecError("--cache is written by one process; under torchrun use spec datagen instead")
        return online.OnlineData(cfg.online, cfg.data, cfg.algorithm, cfg.max_len, cfg.long, cfg.on_error)
    ds = Dataset(cfg.dataset)
    if len(ds) == 0:
        raise SpecError(f"{cfg.dataset}: the dataset holds no samples")
    for k in range(len(ds.manifest.shards)):
        ds.shard(k)
    return ds


def training_stream(cfg: TrainConfig, ds, train_samples: np.ndarray, d: distributed.Dist):
    """The packed rows of the training samples, epoch after epoch; online under torchrun, each rank trains
    on the share of the rows its own engine captures."""
    if cfg.online and d.world > 1:
        from spec_train import online

        return online.sharded_stream(ds, train_samples, cfg, d.world)
    return Stream(train_samples, ds.lengths, cfg.batch_tokens, cfg.seed)


def schedule(cfg: TrainConfig, stream, rows_per_step: int) -> tuple[int, int, int, int]:
    """(total steps, warmup steps, save every, evaluate every), the defaults computed from the run."""
    if cfg.max_steps:
        total = cfg.max_steps
    else:
        total = max(1, stream.rows_for_epochs(cfg.epochs or 1.0) // rows_per_step)
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(config_mod.WARMUP_SHARE * total))
    )
    save_every = cfg.save_every or max(1, math.ceil(total / config_mod.CHECKPOINTS_PER_RUN))
    return total, warmup, save_every, cfg.eval_every or save_every


def optimizer(params: list[torch.Tensor], cfg: TrainConfig, d: distributed.Dist) -> torch.optim.AdamW:
    """AdamW on the fp32 parameters (bf16 is autocast compute only); no decay on 1-D tensors."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=d.device.type == "cuda")


def resume(ckpt: Path, model, opt, trained: set[str], cfg: TrainConfig, d: distributed.Dist):
    """Weights, optimiser state and this rank's RNG from checkpoint `ckpt`; returns (step, tokens,
    elapsed seconds, (best step, best acceptance length)). Republishes final/ from it, which a kill may
    have left half-updated."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    w, osd, st, rng = state.load_checkpoint(ckpt)
    if set(w) != trained:
        raise SpecError(
            f"{ckpt}: holds weights {sorted(set(w) ^ trained)[:3]}... that do not match this draft"
        )
    set_state_dict(model, opt, model_state_dict=w, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))  # fmt: skip
    state.set_rng_state(rng[d.rank])
    if d.main:
        state.publish(ckpt, Path(cfg.out) / state.FINAL)
        write_card(Path(cfg.out) / state.FINAL)
    return st.step, st.tokens, st.elapsed_s, (st.best_step, st.best_acceptance_length)


def non_finite_loss(cfg: TrainConfig, ds, stream, step: int, d: distributed.Dist) -> SpecError:
    """The error for a NaN/inf loss at `step`: the samples of this rank's rows, and where they came from."""
    rows = [i for gr in step_rows(step, d.rank, d.world, cfg.grad_accum) for i, _ in stream.row(gr)]
    if cfg.online:
        where = f"captured online from {cfg.online}; the capture may be broken"
    else:
        files = sorted({ds.manifest.shards[ds.locate(i)[0]].file for i in rows})
        where = (f"in {', '.join(files)}; the dataset may be corrupted: run "
                 f"`spec validate --deep {cfg.dataset}`")  # fmt: skip
    return SpecError(
        f"non-finite loss at step {step + 1} (samples {rows[:8]} {where}). Checkpoints up to "
        f"step {step} are intact."
    )


def evaluate_and_log(model, rows, eval_loader, cfg, d, dtype, weights, log, bar, step: int) -> float | None:
    """Evaluate at `step` on the validation rows (loss and simulated acceptance) and on training rows
    (acceptance); log both. Returns the validation acceptance length (None without validation rows)."""
    val_rows, train_eval_rows = rows
    val_len = None
    if val_rows:
        r = evaluate(model, val_rows, eval_loader, cfg, d, dtype, weights, with_loss=True)
        val_len = r["acceptance_length"]
        if d.main:
            log.write({"split": "val", "step": step, **r})
    r = evaluate(model, train_eval_rows, eval_loader, cfg, d, dtype, weights, with_loss=False)
    if d.main:
        log.write({"split": "train_eval", "step": step, **r})
        shown = val_len if val_len is not None else r["acceptance_length"]
        bar.write(f"[spec train] step {step}: acceptance length {shown:.3f} "
                  f"({'validation' if val_rows else 'training rows'})", file=sys.stderr)  # fmt: skip
    return val_len


def train(cfg: TrainConfig) -> Path:
    # --- setup
    d = distributed.setup()
    absolute = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
    cfg = msgspec.structs.replace(
        cfg, world_size=d.world, dataset=absolute(cfg.dataset), verifier=absolute(cfg.verifier),
        online=absolute(cfg.online), cache=absolute(cfg.cache),
        data=cfg.data and [p if is_hub(p) else absolute(p) for p in cfg.data],
    )  # fmt: skip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.dtype) or auto_dtype(d.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    # --- data
    ds = open_data(cfg, d)
    algo = get_algorithm(cfg.algorithm)
    draft, aux_idx, last_idx = algo.build_draft(cfg, ds, d)
    data_facts, hardware = run_facts(ds, draft), describe_hardware()  # for the model card
    split = training_split(cfg, len(ds))
    if not len(split.val):
        d.say(f"{len(ds)} sample(s): too few to hold any out; training without validation "
                "(best/ is not written, the acceptance shown is on training rows)")  # fmt: skip
    lengths = ds.lengths
    stream = training_stream(cfg, ds, split.train, d)
    cut = cut_report(ds, split.train, cfg.batch_tokens)
    if cut:
        d.say(cut)
    G = d.world * cfg.grad_accum
    total, warmup, save_every, eval_every = schedule(cfg, stream, G)
    val_rows = Rows(split.val, lengths, cfg.batch_tokens)
    val_rows = [val_rows.row(i) for i in range(min(len(val_rows), cfg.max_eval_rows))]
    first = stream.epoch(0)
    train_eval_rows = [first.row(i) for i in range(min(len(first), max(1, len(val_rows)), cfg.max_eval_rows))]
    pad = row_pad_multiple(d.device, dtype)
    weights = config_mod.step_weights(cfg)  # the logged loss's mix of the steps' losses
    # What scales each step's loss: the fixed weights, or 1 where D-PACE weighs every chain's slots itself.
    dpace = config_mod.position_weights(cfg) == "dpace"
    scale_weights = [1.0] * cfg.ttt_steps if dpace else weights
    d.say(f"{len(split.train)} training samples ({int(lengths[split.train].sum())} tokens, "
            f"{len(first)} rows of <= {cfg.batch_tokens} tokens per epoch), {len(split.val)} validation samples; "
            f"{total} steps of {G} rows, warmup {warmup}, draft vocabulary {draft.spec.draft_vocab}, "
            f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} compute, depth weights "
            f"{f'D-PACE (alpha {cfg.dpace_alpha})' if dpace else ', '.join(f'{w:.2f}' for w in weights)}")  # fmt: skip

    # --- model
    draft.lm_head.weight.requires_grad_(cfg.train_lm_head)
    draft.gradient_checkpointing = cfg.gradient_checkpointing
    head = VerifierHead(cfg.verifier, (torch.arange(len(draft.d2t)) + draft.d2t).numpy())
    objective = Objective(draft, head, cfg.ttt_steps, cfg.loss, cfg.loss_chunk, cfg.attn, cfg).to(d.device)
    head.to(dtype=dtype)
    model = distributed.wrap(objective, d, cfg.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, cfg, d)

    # --- resume
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    ckpt = prepare_run_dir(cfg, d)
    # What a checkpoint stores to resume: the state dict less frozen parameters (the verifier's embeddings).
    frozen = {n for n, p in objective.named_parameters() if not p.requires_grad}
    trained = set(objective.state_dict()) - frozen
    start, tokens_done, elapsed0, best = 0, 0, 0.0, (None, None)
    if ckpt is not None:
        start, tokens_done, elapsed0, best = resume(ckpt, model, opt, trained, cfg, d)
        d.say(f"resumed from {ckpt} (step {start} of {total})")
    log = MetricsLog(Path(cfg.out), start if ckpt is not None else None, cfg.tensorboard) if d.main else None
    feed = train_src = eval_src = None
    if cfg.online:  # the capture process starts (ended at exit, or below); evaluation samples come first
        from spec_train import online

        d.say(f"starting the capture engine on {cfg.online} in its own process")
        train_src, eval_src, feed = online.start(cfg, ds, stream, split.val, val_rows, train_eval_rows,
                                                 start, total, d)  # fmt: skip
        d.say(f"capture process {feed.proc.pid} is feeding the trainer")
    loader = RowLoader(cfg.dataset, aux_idx, last_idx, cfg.noise, cfg.seed, dataset=train_src,
                       all_positions=cfg.loss_mask == "all", pad_multiple=pad)  # fmt: skip
    # Evaluation keeps the dataset's loss mask.
    eval_loader = RowLoader(cfg.dataset, aux_idx, last_idx, dataset=eval_src, pad_multiple=pad)

    def save(step: int, val_len: float | None) -> None:
        nonlocal best
        msd, osd = get_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        rng = distributed.all_gather_objects(state.rng_state())
        if d.main:
            is_best = val_len is not None and (best[1] is None or val_len > best[1])
            if is_best:
                best = (step, val_len)
            e, i = stream.locate(step * G)
            st = state.TrainingState(
                step=step, epoch=e, row_in_epoch=i, rows_consumed=step * G, tokens=tokens_done, world_size=d.world,
                lr=opt.param_groups[0]["lr"], elapsed_s=elapsed0 + time.time() - t_start,
                best_step=best[0], best_acceptance_length=best[1],
            )  # fmt: skip
            full = distributed.unwrap(model).draft
            if cfg.fsdp and d.world > 1:  # a plain copy of the gathered weights to write the speculator files
                full = type(full)(full.config)
                full.load_state_dict({k[6:]: v for k, v in msd.items() if k.startswith("draft.")})
            facts = {
                **data_facts,
                "tokens": tokens_done,
                "elapsed_s": round(st.elapsed_s, 1),
                "hardware": hardware,
            }
            full.config = _with_provenance(full, cfg, step, ds, facts)
            path = state.save_checkpoint(
                Path(cfg.out), full, {k: msd[k] for k in trained}, osd, st, rng, cfg.save_dtype
            )
            for dest in [state.FINAL] + [state.BEST] * is_best:
                state.publish(path, Path(cfg.out) / dest)
                write_card(Path(cfg.out) / dest)  # README.md: what the draft is and how it was trained
            state.prune(Path(cfg.out), cfg.keep_last)
        distributed.barrier()

    # --- loop
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not (d.main and cfg.progress), dynamic_ncols=True)  # fmt: skip
    batches = train_batches(stream, loader, start, total, d.rank, d.world, cfg.grad_accum, cfg.num_workers)
    t_start = time.time()
    model.train()
    for step in range(start, total):
        t0 = time.time()
        lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        # Counted slots per TTT step over the whole global batch (all ranks' rows, from token data alone),
        # so that every rank scales its loss the same and the gradient equals one big batch's.
        counts = torch.zeros(cfg.ttt_steps)
        step_tokens = 0  # this rank's tokens (padding not counted)
        for r in range(d.world):
            for gr in step_rows(step, r, d.world, cfg.grad_accum):
                mask, pos = loader.token_view(stream.row(gr))
                counts += algo.slot_counts(mask, pos, cfg.ttt_steps, cfg)
                step_tokens += len(mask) if r == d.rank else 0
        scale = (torch.tensor(scale_weights) / counts.clamp(min=1) * d.world).to(d.device)
        stats = torch.zeros(3, cfg.ttt_steps, device=d.device)
        for m in range(cfg.grad_accum):
            batch = {k: v.to(d.device, non_blocking=True) for k, v in next(batches).items()}
            distributed.sync_gradients(model, m == cfg.grad_accum - 1)
            loss, s = model(batch, scale, dtype)
            loss.backward()
            stats += s
        kill_point("step", step + 1)  # fault injection: spec_format.diagnostics
        distributed.all_reduce_sum(stats)
        per = (stats[0] / stats[2].clamp(min=1)).tolist()
        loss_value = sum(w * x for w, x in zip(weights, per))
        if not math.isfinite(loss_value):
            raise non_finite_loss(cfg, ds, stream, step, d)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.zeros(())
        )
        opt.step()
        opt.zero_grad(set_to_none=True)

        done = step + 1
        tok = torch.tensor([step_tokens], device=d.device)
        tokens_done += int(distributed.all_reduce_sum(tok).item())
        dt = time.time() - t0
        acc = (stats[1] / stats[2].clamp(min=1)).tolist()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc[0]:.2f}", tok_s=f"{int(tok.item() / dt)}")
        if d.main and (done % cfg.log_every == 0 or done == total):
            e, _ = stream.locate(step * G)
            log.write({"split": "train", "step": done, "epoch": e, "lr": lr, "loss": loss_value, "loss_steps": per,
                       "acc_steps": acc, "grad_norm": float(grad_norm), "tokens": tokens_done,
                       "supervised": int(counts[0]),  # positions in this step's loss (TTT step 0)
                       "tokens_per_s": tok.item() / dt, "elapsed_s": elapsed0 + time.time() - t_start})  # fmt: skip
        val_len = None
        if done % eval_every == 0 or done % save_every == 0 or done == total:
            rows = (val_rows, train_eval_rows)
            val_len = evaluate_and_log(model, rows, eval_loader, cfg, d, dtype, weights, log, bar, done)
        if done % save_every == 0 or done == total:
            save(done, val_len)
    bar.close()
    if feed is not None:
        feed.wait_done()  # its cache (if any) committed
        feed.close()
    if d.main:
        if log is not None:
            log.close()
        plot(Path(cfg.out))
        best_note = f", best {best[1]:.3f} at step {best[0]}" if best[0] else ""
        d.say(f"done: {Path(cfg.out) / state.FINAL}{best_note}")
    distributed.barrier()
    distributed.teardown()
    return Path(cfg.out) / state.FINAL
