"""`spec serve`: vLLM's OpenAI server with our draft attached, on the real model; --verifier and -k override
what the draft records; clean SIGTERM shutdown. (vLLM reading a draft directory given as the model, the
plain `spec serve DRAFT` path, is checked without a server in test_vllm_reads_format.py.)"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from spec_format.checkpoint import reseal_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None, timeout=60) -> bytes:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _metric(text: str, name: str) -> float:
    """Sum over labels of a Prometheus counter (exported as NAME_total)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] == name + "_total":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.e2e
def test_spec_serve_runs_draft_and_stops_on_sigterm(tmp_path, demo_model, random_eagle3, spec_cli):
    draft = random_eagle3(tmp_path / "draft", demo_model, draft_vocab=4096, k=2)
    # The draft names a verifier that is not here (as one made on another machine would): --verifier
    # points at the local copy; -k 3 replaces the draft's k = 2.
    config = json.loads((draft / "config.json").read_text())
    config["speculators_config"]["verifier"]["name_or_path"] = str(tmp_path / "not-here")
    (draft / "config.json").write_text(json.dumps(config))
    reseal_checkpoint(draft)  # edited on purpose
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed after the server stops)
    proc = subprocess.Popen(
        [
            spec_cli,
            "serve",
            str(draft),
            "--verifier",
            str(demo_model),
            "-k",
            "3",
            "--port",
            str(port),
            "--served-model-name",
            "smol",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                _get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "server not ready in 240 s"
                time.sleep(2)
        out = json.loads(
            _get(
                f"http://127.0.0.1:{port}/v1/completions",
                {"model": "smol", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
            )
        )
        assert out["usage"]["completion_tokens"] > 0
        metrics = _get(f"http://127.0.0.1:{port}/metrics").decode()
        # the draft ran: vLLM counted draft steps (a random draft is rarely accepted, which is fine here)
        assert _metric(metrics, "vllm:spec_decode_num_drafts") > 0, [
            m for m in metrics.splitlines() if "spec_decode" in m
        ]
        assert _metric(metrics, "vllm:spec_decode_num_draft_tokens") == 3 * _metric(
            metrics, "vllm:spec_decode_num_drafts"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    # the server's engine processes went with it
    time.sleep(1)
    assert not _group_alive(proc.pid)
