"""Acceptance math, the metrics log (JSONL, optional TensorBoard) and the end-of-run plots.

Acceptance under greedy verification with k drafted tokens: the draft's token at depth j is accepted iff
every token before it was and it equals the verifier's greedy token. The conditional acceptance
a_j = P(depth j accepted | depths < j accepted), and the expected tokens per verifier step is
    acceptance length = 1 + sum_{k} prod_{j<=k} a_j            (1 = the verifier's own token)
which is what vLLM reports as mean acceptance length (1 + accepted / drafts).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import msgspec
import torch

from spec_format.errors import SpecError


class AcceptanceEstimate(msgspec.Struct):
    per_position: list[float]  # conditional acceptance a_j, j = 0..k-1
    mean_acceptance_length: float  # 1 + sum_k prod_{j<=k} a_j
    n: int  # draft chains counted (slots whose first drafted token is a supervised token)
    accepted: list[int] = []  # chains accepted through depth j
    reached: list[int] = []  # chains that reached depth j (all earlier depths accepted)


def acceptance_length(per_position: list[float]) -> float:
    total, run = 1.0, 1.0
    for a in per_position:
        run *= a
        total += run
    return total


def chain_counts(match: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """match, eligible bool [k, N] (depth j of chain n: the draft token equals the verifier's greedy token;
    the token at depth j exists and is supervised). Returns (accepted [k], reached [k]) int64: chains
    accepted through depth j, and chains eligible at j whose depths < j were all accepted."""
    alive = torch.ones_like(match[0])
    accepted, reached = [], []
    for j in range(match.shape[0]):
        here = alive & eligible[j]
        reached.append(here.sum())
        alive = here & match[j]
        accepted.append(alive.sum())
    return torch.stack(accepted), torch.stack(reached)


def estimate(accepted: list[int], reached: list[int]) -> AcceptanceEstimate:
    rates = [a / r if r else 0.0 for a, r in zip(accepted, reached)]
    return AcceptanceEstimate(
        per_position=rates,
        mean_acceptance_length=acceptance_length(rates),
        n=int(reached[0]) if reached else 0,
        accepted=[int(a) for a in accepted],
        reached=[int(r) for r in reached],
    )


# ---------------------------------------------------------------------------------------------
# Logging.


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (and TensorBoard scalars when asked).
    On resume, lines past the resumed step (written after the last checkpoint) are dropped first."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: --tensorboard needs the tensorboard package (pip install tensorboard); "
                      "logging to metrics.jsonl only", file=sys.stderr)  # fmt: skip
            else:
                # Events past the resumed step go, as metrics.jsonl's lines do (purge_step: steps >= it).
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: the torn line is dropped on resume (_step)
            raise SpecError(f"{self.path}: writing failed ({e.strerror}); the checkpoints written so far are "
                            "intact: free space and run again with --resume") from None  # fmt: skip
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
                elif isinstance(value, list):
                    for j, v in enumerate(value):
                        self._tb.add_scalar(f"{prefix}/{key}/{j}", v, record["step"])
            if prefix != "train":  # evaluations precede checkpoints: a resumed run finds their steps on disk
                self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


# Line styles of the charts, one per series: lines that meet (acceptance at k = 2, 3, 4, or of two draft
# positions) stay apart by their dash and marker, not by colour alone.
STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1)))]


def _save(fig, path: Path) -> None:
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise SpecError(f"{path}: the chart cannot be written ({e.strerror}); training is complete and "
                        "its checkpoints are intact") from None  # fmt: skip


def plot(run_dir: Path) -> list[Path]:
    """RUN/loss.png and RUN/acceptance.png (figures) from metrics.jsonl."""
    import matplotlib.pyplot as plt

    out = []
    for name, fig in figures(read_metrics(run_dir)).items():
        _save(fig, run_dir / name)
        plt.close(fig)
        out.append(run_dir / name)
    return out


def figures(records: list[dict]) -> dict:
    """{"loss.png": train and validation loss, "acceptance.png": validation acceptance per position and
    acceptance length} against the step (integer ticks) of metrics.jsonl's records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    evals = {s: [r for r in records if r.get("split") == s] for s in ("val", "train_eval")}
    out = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train")
    if evals["val"]:
        ax.plot(
            [r["step"] for r in evals["val"]], [r["loss"] for r in evals["val"]], "o-", label="validation"
        )
    ax.set(xlabel="step", ylabel="loss (weighted over TTT steps)", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out["loss.png"] = fig

    rs = evals["val"] or evals["train_eval"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    if rs:
        steps = [r["step"] for r in rs]
        for j in range(len(rs[-1]["acceptance"])):  # positions may meet: each its own dash and marker
            marker, dash = STYLES[j % len(STYLES)]
            a1.plot(steps, [r["acceptance"][j] for r in rs], marker=marker, linestyle=dash, markerfacecolor="none",
                    label=f"position {j + 1}")  # fmt: skip
        a2.plot(steps, [r["acceptance_length"] for r in rs], "o-", color="k")
    name = "validation" if evals["val"] else "training sample"
    a1.set(
        xlabel="step", ylabel="conditional acceptance", title=f"Acceptance per position ({name})", ylim=(0, 1)
    )
    a1.legend()
    a1.grid(alpha=0.3)
    a2.set(xlabel="step", ylabel="tokens per verifier step", title="Simulated acceptance length")
    a2.set_ylim(bottom=1)  # its floor: a zoomed axis would draw +0.04 as a climb
    a2.grid(alpha=0.3)
    out["acceptance.png"] = fig
    for fig in out.values():
        for a in fig.axes:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at 2.5
        fig.tight_layout()
    return out
