"""The GPU check (issue 7): one script, one H200, under 8 minutes, a JSON of figures. docs/gpu.md has the
run command and the results.

    python tools/gpu_check.py --out $OUT/gpu_check.json      # on the GPU machine
    python tools/gpu_check.py --smoke --out tmp/x.json         # tiny sizes on a CPU (tests/test_gpu_check.py)

Sections (each in its own try/except; the JSON is rewritten after each one, so a timeout keeps the rest):
  train_ours         spec_train's step (Objective: TTT forward + chunked loss, AdamW on fp32 weights, bf16
                     autocast) on a Llama-3.1-8B-sized verifier with random weights: tokens/s, MFU, peak memory
  draft_decode       spec_models' one-token drafting step (greedy_step with a KVCache), eager and captured in
                     a CUDA graph: latency per step and whether the graph's output equals eager's
  hidden_capture     transformers' prefill of a random Llama-8B-sized model built from its config, the hidden
                     states a dataset needs: tokens/s
  train_speculators  vllm-project/speculators 0.9.0's Eagle3DraftModel step, as its Trainer runs it, on the
                     same rows and draft configuration; the ratio ours / theirs
FSDP2 is not here: spec-train's tests run it on CPUs (two gloo processes, test_train.py).

MFU counts model FLOPs, the same formula for both trainers (`train_flops`): matmuls of the draft layer and
fc over every slot and TTT step, attention over the mask's true (query, key) pairs (causal, same
document, plus the TTT diagonal), the draft lm_head and the verifier's target logits over the slots that
count in the loss; backward = 2x forward, 1x for weight-only gradients (fc: the aux states need none;
a frozen lm_head: input gradient only); the target logits are forward only.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for pkg in ("spec-format", "spec-models", "spec-train"):  # the check runs from a plain checkout too
    src = str(ROOT / "packages" / pkg / "src")
    if src not in sys.path:
        sys.path.insert(0, src)

PEAK_FLOPS = 989e12  # H200 SXM, dense BF16 tensor-core peak (NVIDIA's datasheet: 1979 with sparsity)

# Llama-3.1-8B's shapes (the verifier), and the EAGLE-3 draft trained against it.
FULL = dict(
    hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, layers=32, vocab=128256,
    draft_vocab=32768, ttt_steps=3, seqs=[2048, 4096, 8192], compare_seq=8192, warmup=2, steps=5,
    decode_batches=[1, 32], decode_context=1024, decode_iters=200, capture_batch=8, capture_seq=2048,
)  # fmt: skip
SMOKE = dict(
    hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=8, vocab=512,
    draft_vocab=128, ttt_steps=3, seqs=[96, 192], compare_seq=192, warmup=1, steps=2,
    decode_batches=[1, 4], decode_context=32, decode_iters=5, capture_batch=2, capture_seq=64,
)  # fmt: skip


def llama_config(c: dict) -> dict:
    """A Llama-3.1 config.json with the sizes of `c` (rope: llama3 scaling, theta 5e5)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden"],
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"],
        "intermediate_size": c["intermediate"], "num_hidden_layers": c["layers"], "vocab_size": c["vocab"],
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    }  # fmt: skip


def make_verifier_dir(c: dict, out: Path, device: torch.device) -> Path:
    """A verifier directory holding what the trainers read: config.json and the embeddings, final norm and
    lm_head (bf16, N(0, 0.02)); the decoder layers are not needed for training on captured states."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(llama_config(c)))
    gen = torch.Generator(device).manual_seed(0)
    V, H = c["vocab"], c["hidden"]
    tensors = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=gen, device=device, dtype=torch.bfloat16)
        * 0.02,
        "lm_head.weight": torch.randn(V, H, generator=gen, device=device, dtype=torch.bfloat16) * 0.02,
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
    }
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def vocab_mapping(c: dict):
    """The draft vocabulary from Zipf-like token counts (what a real dataset's frequencies look like)."""
    from spec_format.vocab import build_vocab_mapping

    rng = np.random.default_rng(0)
    freq = (1e6 / (1 + rng.permutation(c["vocab"]))).astype(np.int64)
    return build_vocab_mapping(freq, c["draft_vocab"])


def synthetic_row(c: dict, T: int, seed: int) -> dict[str, torch.Tensor]:
    """One packed row as spec_train's RowLoader gives it: documents of 256..2048 tokens (smoke: 16..64),
    each a prompt (the first ~30%, unsupervised) and a supervised reply. Token ids follow the Zipf counts
    of `vocab_mapping` loosely (uniform here: the cost does not depend on them). input_ids, loss_mask,
    position_ids [T]; aux [T, 3H] and last [T, H] float32 holding bf16 values (captured states are bf16)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (256, 2048) if T >= 2048 else (16, 64)
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(int(torch.randint(lo, hi + 1, (1,), generator=g)), T - sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])
    mask = torch.cat([torch.arange(n) >= int(0.3 * n) for n in lengths])
    H = c["hidden"]
    return {
        "input_ids": torch.randint(0, c["vocab"], (T,), generator=g),
        "loss_mask": mask,
        "position_ids": pos,
        "aux": torch.randn(T, 3 * H, generator=g).bfloat16().float(),
        "last": torch.randn(T, H, generator=g).bfloat16().float(),
    }


def train_flops(c: dict, row: dict[str, torch.Tensor], lm_head_trained: bool) -> dict:
    """Model FLOPs of one training step on `row` (see the module docstring), by part."""
    from spec_train.data import supervised_slots

    H, inter, Vd, S = c["hidden"], c["intermediate"], c["draft_vocab"], c["ttt_steps"]
    kv = c["kv_heads"] * c["head_dim"]
    T = row["input_ids"].shape[0]
    pos = row["position_ids"]
    starts = (pos == 0).nonzero().squeeze(1).tolist() + [T]
    docs = np.diff(starts)
    pairs = S * int((docs * (docs + 1) // 2).sum()) + T * S * (S - 1) // 2  # block 0 + TTT diagonals
    valid = supervised_slots(row["loss_mask"], pos, S)
    slots = int(valid.sum())
    targets = torch.zeros(T + S + 1, dtype=torch.bool)
    for j in range(S):
        targets[valid[j].nonzero().squeeze(1) + 1 + j] = True
    layer = 2 * (
        2 * H * H + 2 * 2 * H * kv + H * H + 3 * H * inter
    )  # forward per slot: q,k,v read 2H; o; MLP
    parts = {
        "draft_layer": 3 * S * T * layer,
        "attention": 3 * 4 * H * pairs,
        "fc": 2 * 2 * T * 3 * H * H,
        "lm_head": (3 if lm_head_trained else 2) * 2 * H * Vd * slots,
        "verifier_targets": 2 * H * Vd * int(targets.sum()),
    }
    return {"total": sum(parts.values()), "parts": parts, "loss_slots": slots, "tokens": T}


def memory_peak(device: torch.device) -> float:
    """Peak memory in GiB since the last reset: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, rows: list, c: dict, device: torch.device) -> dict:
    """Run `step(row)` warmup + steps times (rows cycled); time the last `steps` ones."""
    times = []
    for i in range(c["warmup"] + c["steps"]):
        sync(device)
        t0 = time.perf_counter()
        step(rows[i % len(rows)])
        sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[c["warmup"] :]
    return {"first_step_s": times[0], "step_s": float(np.mean(timed)), "step_s_min": min(timed)}


def with_rates(r: dict, flops: dict) -> dict:
    r["tokens_per_s"] = flops["tokens"] / r["step_s"]
    r["model_tflops_per_step"] = flops["total"] / 1e12
    r["achieved_tflops"] = flops["total"] / r["step_s"] / 1e12
    r["mfu"] = flops["total"] / r["step_s"] / PEAK_FLOPS
    r["flops_parts"] = {k: v / 1e12 for k, v in flops["parts"].items()}
    r["loss_slots"] = flops["loss_slots"]
    return r


# ---------------------------------------------------------------------------------------------
# 1. Our training step.


def section_train_ours(c: dict, device: torch.device, work: Path) -> dict:
    from spec_models import init_eagle3_from_verifier
    from spec_train.loss import Objective
    from spec_train.targets import VerifierHead

    vdir = make_verifier_dir(c, work / "verifier", device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's dtype "auto"
    S = c["ttt_steps"]
    # Built once, as train.py builds it (reading 2 GB of verifier tensors takes a while on the host).
    torch.manual_seed(0)
    mapping = vocab_mapping(c)
    draft = init_eagle3_from_verifier(vdir, vocab_mapping=mapping, num_layers=1, speculative_tokens=S)
    head = VerifierHead(vdir, mapping.target_ids)
    objective = Objective(draft, head, S, "kl", 1024, "sdpa").to(device)
    head.to(dtype=dtype)
    out = {"dtype": str(dtype), "attn": "sdpa", "loss": "kl", "loss_chunk": 1024}
    # Every length with the lm_head trained (our default), and the comparison length with it frozen
    # (speculators' setting).
    variants = [(T, True) for T in c["seqs"]] + [(c["compare_seq"], False)]
    out["runs"] = [train_ours(c, objective, T, trained, dtype, device) for T, trained in variants]
    return out


def train_ours(
    c: dict, objective, T: int, train_head: bool, dtype: torch.dtype, device: torch.device
) -> dict:
    """Steps of T-token rows with a fresh AdamW (its state is part of the peak memory)."""
    from spec_train.data import supervised_slots

    S = c["ttt_steps"]
    weights = torch.tensor([0.8**j for j in range(S)])
    weights /= weights.sum()
    reset_memory(device)
    objective.draft.lm_head.weight.requires_grad_(train_head)
    params = [p for p in objective.parameters() if p.requires_grad]
    # The trainer's defaults: lr 1e-3, betas (0.9, 0.95), weight decay 0, fused AdamW on CUDA.
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
    rows = [synthetic_row(c, T, seed) for seed in range(2)]

    def step(row):
        # As train.py's loop: per-step loss scale from the counted slots, forward + fused chunked loss,
        # backward, clipping, AdamW, and the stats read back for the log line.
        counts = supervised_slots(row["loss_mask"], row["position_ids"], S).sum(-1)
        scale = (weights / counts.clamp(min=1)).to(device)
        batch = {k: v.to(device, non_blocking=True) for k, v in row.items()}
        loss, stats = objective(batch, scale, dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats.tolist()

    r = {"seq": T, "lm_head_trained": train_head, **timed_steps(step, rows, c, device)}
    r["peak_memory_gib"] = memory_peak(device)
    return with_rates(r, train_flops(c, rows[0], train_head))


# ---------------------------------------------------------------------------------------------
# 2. vllm-project/speculators' trainer step on the same rows.


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty stand-ins for packages speculators imports only for its data pipeline (datasets, openai),
    used only where they are not installed: every attribute is a placeholder class."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__dict__["__getattr__"] = lambda attr: type(attr, (), {})


def section_train_speculators(c: dict, device: torch.device, work: Path) -> dict:
    if importlib.util.find_spec("speculators") is None:
        return {
            "skipped": "not installed (pip install --no-deps speculators==0.9.0; see tools/gpu_wheels.sh)"
        }
    stubbed = sorted(m for m in ("datasets", "openai") if importlib.util.find_spec(m) is None)
    if stubbed:
        sys.meta_path.append(_StubFinder(set(stubbed)))
    from speculators.losses import resolve_loss_config
    from speculators.models.eagle3 import Eagle3DraftModel
    from transformers import LlamaConfig, get_linear_schedule_with_warmup

    vdir = work / "verifier"
    if not (vdir / "model.safetensors").exists():
        make_verifier_dir(c, vdir, device)
    mapping = vocab_mapping(c)
    S, T = c["ttt_steps"], c["compare_seq"]
    # Its defaults on CUDA: flex attention, forward under torch.compile, the fused (triton) loss. On a CPU
    # (the smoke run) the options it offers for hardware without them: sdpa, eager loss, no compile.
    # Its hidden_states_dtype (the autocast dtype too) is bf16; a CPU runs float32, its other option.
    attn = "simple_flex_attention" if device.type == "cuda" else "sdpa"
    loss_impl = "fused" if device.type == "cuda" else "eager"
    hs_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config(c)
    # The draft decoder config as its create_transformer_layer_config builds it, with full attention on
    # the one layer (its default is a 2048-token sliding window; ours attends to the whole document).
    tl = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "num_hidden_layers")},
                     num_hidden_layers=1, layer_types=["full_attention"])  # fmt: skip
    reset_memory(device)
    torch.manual_seed(0)
    model = Eagle3DraftModel.from_training_args(
        verifier_config=tl, t2d=torch.from_numpy(mapping.t2d), d2t=torch.from_numpy(mapping.d2t),
        verifier_name_or_path=str(vdir), draft_vocab_size=c["draft_vocab"], norm_before_residual=False,
        norm_output=False, ttt_steps=S, target_layer_ids=[2, c["layers"] // 2, c["layers"] - 3],
        draft_attn_impl=attn,
    )  # fmt: skip
    model.to(device)  # fp32 master weights, as its Trainer (model.to(local_rank))
    model.train()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)  # its build_optimizers
    sched = get_linear_schedule_with_warmup(opt, 1, 1000)
    loss_config = resolve_loss_config("kl_div", loss_impl)
    rows = [synthetic_row(c, T, seed) for seed in range(2)]

    def batch_of(row):
        """Its collated batch: [1, T] tensors (hidden states [1, T, 3H] and [1, T, H]), document ids."""
        doc = torch.cumsum((row["position_ids"] == 0).long(), 0) - 1
        b = {"input_ids": row["input_ids"], "hidden_states": row["aux"].to(hs_dtype),
             "verifier_last_hidden_states": row["last"].to(hs_dtype), "loss_mask": row["loss_mask"],
             "position_ids": row["position_ids"], "document_ids": doc}  # fmt: skip
        return {k: v[None].to(device, non_blocking=True) for k, v in b.items()}

    def step(row):
        # Its Trainer.train_epoch: autocast(bf16) forward returning the loss, zero_grad, backward, clip 1.0,
        # optimizer and scheduler steps (the per-step metric read-back of log_freq=1 left out).
        with torch.autocast(device.type, dtype=hs_dtype, enabled=hs_dtype != torch.float32):
            _tokens, loss, _metrics = model(**batch_of(row), ttt_steps=S, ttt_step_loss_decay=1.0,
                                            loss_config=loss_config)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

    r = {"version": importlib.metadata.version("speculators"), "seq": T, "attn": attn,
         "hidden_states_dtype": str(hs_dtype), "lm_head_trained": False, "stubbed_modules": stubbed}  # fmt: skip
    try:
        timing = timed_steps(step, rows, c, device)
        r.update(torch_compile=device.type == "cuda", loss_implementation=loss_impl)
    except Exception as e:
        if device.type != "cuda":
            raise
        # torch.compile or the triton loss failed here (a missing compiler, say): its eager path instead.
        r["compiled_error"] = f"{type(e).__name__}: {e}"[:2000]
        torch._dynamo.config.disable = True
        loss_config = resolve_loss_config("kl_div", "eager")
        timing = timed_steps(step, rows, c, device)
        r.update(torch_compile=False, loss_implementation="eager")
    r.update(timing)
    r["peak_memory_gib"] = memory_peak(device)
    return with_rates(r, train_flops(c, rows[0], lm_head_trained=False))


def compare(ours: dict, theirs: dict) -> dict:
    """Ours / theirs at the comparison length: against our frozen-lm_head run (their configuration) and
    against our default (lm_head trained, more work per step)."""
    out = {}
    for name, trained in (("same_config", False), ("ours_default", True)):
        mine = next(r for r in ours["runs"] if r["seq"] == theirs["seq"] and r["lm_head_trained"] == trained)
        out[name] = {
            "tokens_per_s_ratio": mine["tokens_per_s"] / theirs["tokens_per_s"],
            "mfu_ratio": mine["mfu"] / theirs["mfu"],
            "peak_memory_ratio": mine["peak_memory_gib"] / theirs["peak_memory_gib"],
        }
    return out


# ---------------------------------------------------------------------------------------------
# 3. Drafting step: eager vs CUDA graph.


def section_draft_decode(c: dict, device: torch.device, work: Path) -> dict:
    from spec_models import init_eagle3_from_verifier

    vdir = work / "verifier"
    if not (vdir / "model.safetensors").exists():
        make_verifier_dir(c, vdir, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    draft = init_eagle3_from_verifier(vdir, vocab_mapping=vocab_mapping(c), num_layers=1).to(device, dtype)
    draft.eval()
    out = {"dtype": str(dtype), "context": c["decode_context"]}
    if device.type != "cuda":
        out["note"] = "no CUDA: graph capture skipped, eager latency only"
    with torch.no_grad():
        out["runs"] = [decode_batch(c, draft, B, device, dtype) for B in c["decode_batches"]]
    return out


def decode_batch(c: dict, draft, B: int, device: torch.device, dtype: torch.dtype) -> dict:
    """B requests with a context of decode_context tokens in the cache; then the one-token step."""
    from spec_models import KVCache, extend, greedy_step

    H, L, n = c["hidden"], c["decode_context"], c["decode_iters"]
    g = torch.Generator().manual_seed(B)
    cache = KVCache.empty(draft, B, L + 8)
    ids = torch.randint(0, c["vocab"], (B, L), generator=g).to(device)
    aux = torch.randn(B, L, 3 * H, generator=g).to(device, dtype)
    pos = torch.arange(L, device=device).expand(B, L)
    normed, hidden = extend(draft, cache, ids, draft.combine(aux), pos)
    # The step's inputs after the context: ids [B], hidden [B, H], pos [B].
    s_ids, s_hidden = draft.greedy(normed[:, -1]), hidden[:, -1].clone()
    s_pos = torch.full((B,), L, device=device)
    saved = [t.clone() for t in cache.k + cache.v]

    def eager(x, h, p):
        return greedy_step(draft, cache, x, h, p)

    def chain(run, k=3):
        """k chained steps from the state after the context: [(token [B], hidden [B, H]) per step]."""
        for dst, src in zip(cache.k + cache.v, saved):
            dst.copy_(src)
        x, h, p, res = s_ids, s_hidden, s_pos, []
        for _ in range(k):
            x, h = run(x, h, p)
            res.append((x.clone(), h.clone()))
            p = p + 1
        return res

    for _ in range(3):
        eager(s_ids, s_hidden, s_pos)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        eager(s_ids, s_hidden, s_pos)
    sync(device)
    r = {"batch": B, "eager_step_us": (time.perf_counter() - t0) / n * 1e6}
    if device.type != "cuda":
        return r

    def graph() -> dict:
        # Static input buffers; the graph reads them and writes its outputs to fixed tensors.
        x_in, h_in, p_in = s_ids.clone(), s_hidden.clone(), s_pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream before capture, as torch asks
            for _ in range(3):
                eager(x_in, h_in, p_in)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            x_out, h_out = eager(x_in, h_in, p_in)

        def replay(x, h, p):
            x_in.copy_(x)
            h_in.copy_(h)
            p_in.copy_(p)
            g.replay()
            return x_out, h_out

        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / n * 1e6
        a, b = chain(eager), chain(replay)
        return {
            "graph_step_us": us,
            "speedup": r["eager_step_us"] / us,
            "tokens_equal": all(bool((x == y).all()) for (x, _), (y, _) in zip(a, b)),
            "hidden_max_abs_diff": max(float((h - k).abs().max()) for (_, h), (_, k) in zip(a, b)),
        }

    try:
        r.update(graph())
    except Exception as e:  # a failed capture keeps the eager figures
        r["graph_error"] = f"{type(e).__name__}: {e}"[:2000]
    return r


# ---------------------------------------------------------------------------------------------
# 4. Hidden-state capture with transformers.


def section_hidden_capture(c: dict, device: torch.device, work: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**llama_config(c))).eval()
    finally:
        torch.set_default_dtype(prev)
    B, T = c["capture_batch"], c["capture_seq"]
    ids = torch.randint(0, c["vocab"], (B, T), device=device)
    params = sum(p.numel() for p in model.parameters())
    out = {"dtype": str(dtype), "batch": B, "seq": T, "params_b": params / 1e9, "runs": []}
    # Prefill FLOPs: 2 x non-embedding params per token + causal attention (4 * L * H per (q, k) pair).
    dense = 2 * (params - 2 * c["vocab"] * c["hidden"]) * B * T
    attn = 4 * c["layers"] * c["hidden"] * B * T * (T + 1) // 2
    for name, kwargs in (("hidden_states_last_logits", {"logits_to_keep": 1}), ("full_logits", {})):
        reset_memory(device)

        def run(kwargs=kwargs):
            with torch.no_grad():
                return model(ids, output_hidden_states=True, **kwargs).hidden_states

        run()
        times = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
        s = float(np.mean(times))
        head = 2 * c["hidden"] * c["vocab"] * (B if kwargs else B * T)
        out["runs"].append({"variant": name, "step_s": s, "tokens_per_s": B * T / s,
                            "mfu": (dense + attn + head) / s / PEAK_FLOPS,
                            "peak_memory_gib": memory_peak(device)})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------


def write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    ap.add_argument("--out", type=Path, default=default_out, required=default_out is None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on a CPU in seconds")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    a = ap.parse_args()
    c = SMOKE if a.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # The verifier files (2 GB at full size) go to scratch space, never next to --out ($OUT comes back).
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_")
    work = a.work or Path(tmp.name)
    import transformers

    result = {
        "meta": {
            "smoke": a.smoke, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "peak_flops": PEAK_FLOPS,
            "peak_source": "H200 SXM dense BF16 (989.4 TFLOP/s, NVIDIA datasheet); MFU against it even on other devices",
            "sizes": c, "fsdp2": "not run here: spec-train's tests run FSDP2 on CPUs (test_two_processes_fsdp2_match_one_process)",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    }  # fmt: skip
    t_all = time.perf_counter()
    sections = [
        ("train_ours", section_train_ours),
        ("draft_decode", section_draft_decode),
        ("hidden_capture", section_hidden_capture),
        ("train_speculators", section_train_speculators),
    ]
    for name, fn in sections:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            result[name] = fn(c, device, work)
        except Exception as e:  # one section's failure must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        result[name]["seconds"] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {json.dumps(result[name])[:2000]}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(a.out, result)
    if "tokens_per_s" in result["train_speculators"] and "runs" in result["train_ours"]:
        result["comparison"] = compare(result["train_ours"], result["train_speculators"])
    result["meta"]["seconds"] = time.perf_counter() - t_all
    write(a.out, result)
    tmp.cleanup()
    print(f"[gpu_check] wrote {a.out} in {result['meta']['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
