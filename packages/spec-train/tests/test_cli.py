"""`spec train`'s flags come from TrainConfig: every field's default is the one its help shows and the one a
run gets without the flag; flags and a config file resolve onto the struct."""

import re

import pytest
from click.testing import CliRunner

from spec_train import cli
from spec_train.config import TrainConfig


@pytest.fixture()
def captured(monkeypatch):
    """Runs `spec train ARGS` up to the start of training and returns the TrainConfig it would train with."""
    import spec_train.train

    got = []
    monkeypatch.setattr(spec_train.train, "train", got.append)

    def run(*args):
        res = CliRunner().invoke(cli.train_command, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return got.pop()

    return run


def test_every_default_the_help_shows_is_what_a_run_gets(captured, tmp_path, tiny_model):
    """Each flag's [default: X] in --help against the TrainConfig `spec train` resolves without that flag
    (not against the struct field the help is written from)."""
    ds = tmp_path / "ds"
    ds.mkdir()
    cfg = captured(ds, "--verifier", tiny_model("llama"), "--out", tmp_path / "run")
    shown = {}
    for p in cli.train_command.params:
        if m := re.search(r"\[default: ([^\]]+)\]", p.help or ""):
            v = getattr(cfg, p.name)
            shown[p.name] = (m.group(1), ("on" if v else "off") if isinstance(v, bool) else str(v))
    assert {k: a for k, (a, _) in shown.items()} == {k: b for k, (_, b) in shown.items()}
    assert {"ttt_steps", "lr", "batch_tokens", "train_lm_head"} <= shown.keys() and len(shown) > 20, shown
    help_text = " ".join(CliRunner().invoke(cli.train_command, ["--help"]).output.split())
    assert "--train-lm-head / --no-train-lm-head Train" in help_text and "[default: on]" in help_text
    assert "--dataset" not in help_text and "--world-size" not in help_text


def test_flags_and_config_file_resolve_onto_the_struct(captured, tmp_path, tiny_model):
    ds, v = tmp_path / "ds", tiny_model("llama")
    ds.mkdir()
    plain = captured(ds, "--verifier", v, "--out", tmp_path / "run")
    assert plain == TrainConfig(dataset=str(ds), verifier=str(v), out=str(tmp_path / "run"))
    conf = tmp_path / "c.toml"
    conf.write_text("lr = 0.01\nsave-every = 7\ntrain_lm_head = false\n")
    cfg = captured(ds, "--verifier", v, "--out", tmp_path / "run", "--config", conf, "--lr", "0.02",
                   "--step-weights", "1,0.5,0.25", "--loss-mask", "all", "--resume", "--epochs", "2")  # fmt: skip
    assert (cfg.lr, cfg.save_every, cfg.train_lm_head) == (0.02, 7, False)  # flag > file > default
    assert (
        cfg.step_weights == [1.0, 0.5, 0.25] and cfg.loss_mask == "all" and cfg.resume and cfg.epochs == 2.0
    )


def test_json_output_keeps_stdout_for_the_one_object():
    """spec eval --json: vLLM's engine processes inherit file descriptor 1 and log there; after
    _stdout_for_json they, and prints, reach stderr, and stdout holds only the JSON object."""
    import subprocess
    import sys

    code = ("import json, os; from spec_train.cli import _stdout_for_json; out = _stdout_for_json(); "
            "os.system('echo engine log'); print('python log'); out.write(json.dumps({'a': 1}) + '\\n')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == '{"a": 1}\n'
    assert "engine log" in proc.stderr and "python log" in proc.stderr


def test_online_flags_resolve_and_wrong_combinations_are_one_line(captured, tmp_path, tiny_model):
    from spec_format.errors import SpecError

    v, rows = tiny_model("llama"), tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi", "completion": "hello"}\n')
    cfg = captured(
        "--online", v, "--data", rows, "--data", rows, "--out", tmp_path / "run", "--cache", tmp_path / "c"
    )
    assert (cfg.dataset, cfg.verifier, cfg.data, cfg.cache) == (
        None,
        str(v),
        [str(rows)] * 2,
        str(tmp_path / "c"),
    )
    ds = tmp_path / "ds"
    ds.mkdir()
    for args, msg in (
        ([ds, "--online", v, "--data", rows], "not both"),
        (["--online", v], "--online needs --data"),
        ([ds, "--verifier", v, "--data", rows], "--data needs --online"),
        ([ds], "--verifier is required"),
        (["--online", v, "--data", rows, "--num-workers", "2"], "--num-workers"),
    ):
        res = CliRunner().invoke(cli.train_command, [str(a) for a in [*args, "--out", tmp_path / "r"]])
        assert isinstance(res.exception, SpecError) and msg in str(res.exception), (args, res.output)


def test_position_weights_default_by_algorithm_and_refuse_a_mix():
    """D-PACE is DFlash's default (it measured better there), fixed weights EAGLE-3's and with
    --step-weights; D-PACE with --step-weights, or an alpha outside (0, 1], is one clear error."""
    from spec_format.errors import SpecError
    from spec_train.config import check, position_weights

    base = {"dataset": "ds", "out": "run"}
    assert position_weights(TrainConfig(**base, algorithm="dflash")) == "dpace"
    assert position_weights(TrainConfig(**base)) == "decay"
    assert position_weights(TrainConfig(**base, algorithm="dflash", step_weights=[1, 1, 1])) == "decay"
    assert position_weights(TrainConfig(**base, position_weights="dpace")) == "dpace"
    for bad, msg in (({"position_weights": "dpace", "step_weights": [1, 1, 1]}, "--step-weights"),
                     ({"dpace_alpha": 0.0}, "--dpace-alpha")):  # fmt: skip
        with pytest.raises(SpecError, match=msg):
            check(TrainConfig(**base, **bad))
