"""spec convert: every source layout converts into a valid checkpoint with the right names, values, layer ids
and vocabulary mapping, and every defect of a source (missing, unknown or mis-shaped tensor, another
vocabulary) fails with one line per problem and writes nothing. No vLLM engine here."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spec_convert.build import Options
from spec_convert.convert import convert_to_spec
from spec_convert.layer_config import LLAMA_DEFAULTS, QWEN3_DEFAULTS
from spec_convert.source import read_source
from spec_convert.strict import ConversionError
from spec_format.checkpoint import read_checkpoint
from spec_format.tensors import load_tensors, save_tensors, tensor_dtypes
from spec_format.validate import validate_checkpoint

FORMATS = ["eagle3", "specforge", "modelopt", "speculators"]
# The name each layout gives the format's layers.0.* tensors.
LAYER0 = {
    "eagle3": "midlayer.",
    "specforge": "midlayer.",
    "modelopt": "layers.0.",
    "speculators": "layers.0.",
}
STORED = {"eagle3": "F16", "specforge": "BF16", "modelopt": "BF16", "speculators": "BF16"}


def run(spec_cli, *args) -> subprocess.CompletedProcess:
    return subprocess.run([spec_cli, "convert", *map(str, args)], capture_output=True, text=True, timeout=300)


def to_format_name(fmt: str, name: str) -> str:
    return "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name


def mutate_source(src: Path, fn) -> None:
    """Apply fn to the source's {name: array} and write it back in the same file type and dtypes."""
    if (src / "pytorch_model.bin").exists():
        import torch

        state = torch.load(src / "pytorch_model.bin", weights_only=True)
        arrays = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
        fn(arrays)
        torch.save(
            {k: torch.from_numpy(np.ascontiguousarray(a)).half() if a.dtype.kind == "f" else torch.from_numpy(a)
             for k, a in arrays.items()},
            src / "pytorch_model.bin",
        )  # fmt: skip
        return
    arrays = {k: np.array(v) for k, v in load_tensors(src / "model.safetensors").items()}
    fn(arrays)
    save_tensors(src / "model.safetensors", arrays, float_dtype="bfloat16")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_layout_converts_to_a_valid_checkpoint(tmp_path, verifier, source_writers, spec_cli, fmt):
    src = source_writers[fmt](tmp_path / "src", verifier)
    out = tmp_path / "out"
    res = run(spec_cli, src, "--verifier", verifier, "--out", out)
    assert res.returncode == 0, res.stderr
    assert f"({fmt}: " in res.stdout  # auto-detected as the layout it is
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind
    report = validate_checkpoint(out, verifier)
    assert report.ok and not report.warnings, report
    check = subprocess.run(
        [spec_cli, "validate", str(out), "--verifier", str(verifier)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "valid checkpoint" in check.stdout, check.stderr

    cfg, tensors = read_checkpoint(out)
    source = read_source(src)
    # every source tensor arrives with the same values under the format's name, or was dropped for a reason
    dropped = cfg.spec.provenance["dropped"]
    for name, arr in source.tensors.items():
        if name in dropped:
            continue
        assert np.array_equal(tensors[to_format_name(fmt, name)], arr), name
    assert set(dropped) == {n for n in source.tensors if n.startswith("target_model.")}
    assert all(
        d == STORED[fmt]
        for n, d in tensor_dtypes(out / "model.safetensors").items()
        if n not in ("d2t", "t2d")
    )
    # the vocabulary mapping: offsets, t2d consistent (ModelOpt stores none: derived)
    targets = np.arange(128) + tensors["d2t"]
    assert tensors["t2d"].dtype == np.bool_ and tensors["t2d"].sum() == 128 and tensors["t2d"][targets].all()
    assert cfg.eagle_aux_hidden_state_layer_ids == [2, 4, 5]  # 8-layer verifier: 2, L//2, L-3 in every source
    assert cfg.draft_vocab_size == 128 and cfg.speculative_tokens == 3
    assert cfg.norm_before_residual is False and cfg.norm_before_fc is False and cfg.norm_output is False
    prov = cfg.spec.provenance
    assert prov["source"]["format"] == fmt and prov["source"]["files"] == source.files
    assert "target_id = draft_id + d2t[draft_id]" in prov["vocab"]["d2t"]
    assert cfg.spec.verifier.name_or_path == str(verifier.resolve())


def test_conventions_each_source_records(tmp_path, verifier, source_writers):
    """Layer ids recorded as decoder-layer outputs (SpecForge, ModelOpt) become vLLM ids x + 1; speculators
    ids are vLLM's already; --layers overrides, --k sets the speculative tokens."""
    w = source_writers
    cases = {
        "specforge": (w["specforge"](tmp_path / "sf", verifier, capture_layers=[0, 3, 6]), [1, 4, 7]),
        "eagle3": (w["eagle3"](tmp_path / "ea", verifier), [2, 4, 5]),
    }
    for fmt, (src, expected) in cases.items():
        converted, _, _ = convert_to_spec(src, tmp_path / f"out-{fmt}", verifier, fmt)
        assert converted.config.eagle_aux_hidden_state_layer_ids == expected, fmt
    mo = w["modelopt"](tmp_path / "mo", verifier)
    cfg = json.loads((mo / "config.json").read_text())
    cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [2, 5, 6]
    (mo / "config.json").write_text(json.dumps(cfg))
    converted, _, _ = convert_to_spec(mo, tmp_path / "out-mo", verifier, options=Options(k=5))
    assert (
        converted.config.eagle_aux_hidden_state_layer_ids == [3, 6, 7]
        and converted.config.speculative_tokens == 5
    )
    sp = w["speculators"](tmp_path / "sp", verifier)
    converted, _, _ = convert_to_spec(sp, tmp_path / "out-sp", verifier, options=Options(layers=[1, 3, 8]))
    assert converted.config.eagle_aux_hidden_state_layer_ids == [1, 3, 8]
    assert "--layers" in converted.config.spec.provenance["layer_ids"]["from"]


def test_midlayer_safetensors_convert_with_either_project_conventions(tmp_path, verifier, source_writers):
    """SafeAILab's inference code also loads a model.safetensors; --from eagle3 reads it with the EAGLE
    code's conventions and gives what auto-detection (SpecForge) gives when no SpecForge field is set."""
    import torch
    from safetensors.torch import save_file

    src = source_writers["eagle3"](tmp_path / "ea", verifier, rope_buffers=False)
    save_file(torch.load(src / "pytorch_model.bin", weights_only=True), src / "model.safetensors")
    (src / "pytorch_model.bin").unlink()
    a, fmt_a, _ = convert_to_spec(src, tmp_path / "a", verifier, fmt="eagle3")
    b, fmt_b, _ = convert_to_spec(src, tmp_path / "b", verifier)
    assert (fmt_a, fmt_b) == ("eagle3", "specforge")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert a.config.eagle_aux_hidden_state_layer_ids == b.config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]


def test_modelopt_frequency_ordered_d2t_is_kept_and_t2d_derived(tmp_path, verifier, source_writers):
    src = source_writers["modelopt"](tmp_path / "mo", verifier, num_layers=2)
    convert_to_spec(src, tmp_path / "out", verifier)
    _, tensors = read_checkpoint(tmp_path / "out")
    d2t = load_tensors(src / "model.safetensors")["d2t"]
    assert np.array_equal(tensors["d2t"], d2t)
    targets = np.arange(len(d2t)) + d2t
    assert np.any(np.diff(targets) < 0)  # frequency order survives: lm_head rows still follow draft ids
    assert np.flatnonzero(tensors["t2d"]).tolist() == sorted(targets.tolist())
    assert "layers.1.self_attn.q_proj.weight" in tensors and "layers.1.hidden_norm.weight" not in tensors


def test_specforge_eagle31_and_hf_export(tmp_path, verifier, source_writers):
    """fc_norm (Eagle 3.1) becomes vLLM's fc_norm; an `--to hf` export's embed_tokens is kept."""
    src = source_writers["specforge"](tmp_path / "sf", verifier, fc_norm=True, embed=True)
    converted, _, _ = convert_to_spec(src, tmp_path / "out", verifier)
    assert converted.config.fc_norm is True and converted.config.norm_output is False
    assert {"fc_norm.0.weight", "fc_norm.2.weight", "embed_tokens.weight"} <= set(converted.tensors)


def test_specforge_without_final_norm_is_refused(tmp_path, verifier, source_writers):
    src = source_writers["specforge"](tmp_path / "sf", verifier)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"norm_output": False}))
    with pytest.raises(ConversionError, match="norm_output is false"):
        convert_to_spec(src, tmp_path / "out", verifier)


def test_speculators_upgrade_writes_what_vllm_read(tmp_path, verifier, source_writers):
    src = source_writers["speculators"](tmp_path / "sp", verifier, verifier_copies=True)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["norm_before_residual"]  # vLLM reads a missing one as true
    cfg["speculators_config"]["verifier"]["name_or_path"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    converted, fmt, _ = convert_to_spec(src, tmp_path / "out", verifier, verifier_name="org/target")
    c = converted.config
    assert fmt == "speculators" and c.norm_before_residual is True and c.norm_output is False
    assert c.eagle_aux_hidden_state_layer_ids == [2, 4, 5] and c.verifier_name == "org/target"
    # transformer_layer_config was a to_diff_dict: the defaults vLLM's LlamaConfig applies are now explicit
    lc = c.transformer_layer_config
    assert lc["rms_norm_eps"] == 1e-6 and lc["hidden_act"] == "silu" and lc["rope_theta"] == 10000.0
    assert set(c.spec.provenance["dropped"]) == {"verifier_lm_head.weight", "verifier_norm.weight"}
    assert c.spec.provenance["source"]["speculators_version"] == "0.1.0.dev14"


def test_speculators_layer_type_follows_the_weights_when_the_config_lost_it(
    tmp_path, verifier, source_writers
):
    src = source_writers["speculators"](tmp_path / "sp", verifier, qwen3_without_model_type=True)
    converted, _, _ = convert_to_spec(src, tmp_path / "out", verifier)
    lc = converted.config.transformer_layer_config
    assert lc["model_type"] == "qwen3" and lc["architectures"] == ["Qwen3ForCausalLM"]
    assert "layers.0.self_attn.q_norm.weight" in converted.tensors
    assert any("no model_type" in n for n in converted.notes)


def test_speculators_other_algorithms_are_refused(tmp_path, verifier, source_writers):
    src = source_writers["speculators"](tmp_path / "sp", verifier)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"speculators_model_type": "eagle"}))
    with pytest.raises(ConversionError, match="speculators_model_type is 'eagle'"):
        convert_to_spec(src, tmp_path / "out", verifier)


def test_safailab_full_vocabulary_drops_the_mapping_as_its_code_does(tmp_path, verifier, source_writers):
    src = source_writers["eagle3"](tmp_path / "ea", verifier, draft_vocab=512)
    converted, _, _ = convert_to_spec(src, tmp_path / "out", verifier)
    assert "d2t" not in converted.tensors and "t2d" not in converted.tensors
    assert "ea_model.py" in converted.config.spec.provenance["dropped"]["d2t"]


def test_safailab_config_with_specforge_fields_points_to_specforge(tmp_path, verifier, source_writers):
    src = source_writers["eagle3"](tmp_path / "ea", verifier)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps(cfg | {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}})
    )
    with pytest.raises(ConversionError, match="convert with --from specforge"):
        convert_to_spec(src, tmp_path / "out", verifier)


def test_modelopt_non_eagle3_exports_are_refused(tmp_path, verifier, source_writers):
    src = source_writers["modelopt"](tmp_path / "mo", verifier)
    cfg = json.loads((src / "config.json").read_text())
    cfg["eagle_config"]["use_aux_hidden_state"] = False
    cfg["quantization_config"] = {"quant_method": "modelopt"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as e:
        convert_to_spec(src, tmp_path / "out", verifier)
    assert any("EAGLE-1/2" in p for p in e.value.problems) and any("quantized" in p for p in e.value.problems)


# --- defects of a source: one line each, nothing written --------------------------------------------


def _missing(fmt, src):
    mutate_source(src, lambda t: t.pop(LAYER0[fmt] + "post_attention_layernorm.weight"))
    return f"missing tensor '{LAYER0[fmt]}post_attention_layernorm.weight'"


def _unknown(fmt, src):
    mutate_source(src, lambda t: t.update({"extra_head.weight": np.zeros((4, 64), np.float32)}))
    return "unknown tensor 'extra_head.weight' [4, 64]"


def _wrong_shape(fmt, src):
    mutate_source(src, lambda t: t.update({"fc.weight": np.zeros((64, 128), np.float32)}))
    return "tensor 'fc.weight': expected shape [64, 192], found [64, 128]"


DEFECTS = {"missing tensor": _missing, "unknown tensor": _unknown, "wrong shape": _wrong_shape}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_source_defects_fail_and_write_nothing(tmp_path, verifier, source_writers, spec_cli, fmt, defect):
    src = source_writers[fmt](tmp_path / "src", verifier)
    expected = DEFECTS[defect](fmt, src)
    out = tmp_path / "out"
    res = run(spec_cli, src, "--verifier", verifier, "--out", out)
    assert res.returncode == 1, res.stdout
    lines = res.stderr.strip().splitlines()
    assert any(expected in line for line in lines), res.stderr
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in res.stderr
    assert "nothing was written" in lines[-1]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src", "verifier"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_vocabulary_mismatch_with_the_verifier_fails(
    tmp_path, verifier, source_writers, fake_verifier, spec_cli, fmt
):
    src = source_writers[fmt](tmp_path / "src", verifier)
    other = fake_verifier(tmp_path, vocab=1024, name="other")
    res = run(spec_cli, src, "--verifier", other, "--out", tmp_path / "out")
    assert res.returncode == 1
    assert "vocab_size is 512, the verifier's is 1024" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_verifier_with_another_hidden_size_fails_on_shapes(tmp_path, verifier, source_writers, fake_verifier):
    src = source_writers["eagle3"](tmp_path / "src", verifier)
    wide = fake_verifier(tmp_path, hidden=128, name="wide")
    with pytest.raises(ConversionError) as e:
        convert_to_spec(src, tmp_path / "out", wide)
    assert any("'fc.weight': expected shape [64, 384], found [64, 192]" in p for p in e.value.problems), (
        e.value.problems
    )


def test_layer_ids_that_do_not_fit_fail(tmp_path, verifier, source_writers, spec_cli):
    src = source_writers["specforge"](tmp_path / "src", verifier)
    res = run(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "out", "--layers", "2,4")
    assert res.returncode == 1 and "but fc.weight takes 3 hidden states" in res.stderr, res.stderr
    res = run(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "out", "--layers", "5,2,9")
    assert "must be distinct and increasing" in res.stderr and "outside [0, 8]" in res.stderr, res.stderr


# --- output directory, detection, torch-free reading ---------------------------------------------------


def test_out_is_never_half_written_or_silently_replaced(tmp_path, verifier, source_writers, spec_cli):
    src = source_writers["specforge"](tmp_path / "src", verifier)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run(spec_cli, src, "--verifier", verifier, "--out", out)
    assert res.returncode == 1 and "not empty" in res.stderr and (out / "keep.txt").read_text() == "mine"
    mutate_source(src, lambda t: t.pop("fc.weight"))
    res = run(spec_cli, src, "--verifier", verifier, "--out", out, "--force")
    assert res.returncode == 1 and (out / "keep.txt").read_text() == "mine"  # a failed --force keeps the old
    src = source_writers["specforge"](tmp_path / "src2", verifier)
    res = run(spec_cli, src, "--verifier", verifier, "--out", out, "--force")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "src2", "verifier"]


def test_unknown_layouts_and_two_weight_sets_are_refused(tmp_path, verifier, source_writers, spec_cli):
    src = source_writers["modelopt"](tmp_path / "src", verifier)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["eagle_config"]
    (src / "config.json").write_text(json.dumps(cfg))
    res = run(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "out")
    assert res.returncode == 1 and "not a draft layout spec convert knows" in res.stderr
    (src / "pytorch_model.bin").write_bytes(b"")
    res = run(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "out", "--from", "modelopt")
    assert res.returncode == 1 and "holds both" in res.stderr, res.stderr


def test_safetensors_sources_never_import_torch(tmp_path, verifier, source_writers):
    src = source_writers["specforge"](tmp_path / "src", verifier)
    code = (
        "import sys\n"
        "from spec_convert.convert import convert_to_spec\n"
        f"convert_to_spec({str(src)!r}, {str(tmp_path / 'out')!r}, {str(verifier)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bin_files_are_never_unpickled_beyond_tensors(tmp_path, verifier, source_writers, spec_cli):
    """A .bin whose pickle would run code is refused by torch.load(weights_only=True): the code never runs."""
    import pickle

    src = source_writers["eagle3"](tmp_path / "src", verifier)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"fc.weight": Payload()}))
    res = run(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "out")
    assert res.returncode == 1 and "weights_only=True" in res.stderr, res.stderr
    assert not marker.exists()


def test_default_tables_match_transformers():
    """The config defaults the converters fill in are transformers' own (the source projects read them)."""
    from transformers import LlamaConfig, Qwen3Config

    for cls, table in ((LlamaConfig, LLAMA_DEFAULTS), (Qwen3Config, QWEN3_DEFAULTS)):
        d = cls().to_dict()
        d["rope_theta"] = d.get("rope_theta") or d["rope_parameters"]["rope_theta"]
        assert {k: d[k] for k in table} == table, cls.__name__


@pytest.mark.parametrize("fmt", FORMATS)
def test_vllm_reads_every_converted_config(tmp_path, verifier, source_writers, fmt):
    """vLLM's own speculators parser takes each conversion: method, k, verifier, draft architecture, flags."""
    from vllm.transformers_utils.config import maybe_override_with_speculators
    from vllm.transformers_utils.configs.speculators import SpeculatorsConfig

    src = source_writers[fmt](tmp_path / "src", verifier, **({"fc_norm": True} if fmt == "specforge" else {}))
    convert_to_spec(src, tmp_path / "out", verifier, options=Options(k=2))
    model, _, spec = maybe_override_with_speculators(str(tmp_path / "out"), None, trust_remote_code=False)
    assert model == str(verifier.resolve())
    assert spec == {"method": "eagle3", "num_speculative_tokens": 2, "model": str(tmp_path / "out")}
    hf = SpeculatorsConfig.from_pretrained(str(tmp_path / "out"))
    assert hf.architectures == ["Eagle3LlamaForCausalLM"] and hf.eagle_aux_hidden_state_layer_ids == [2, 4, 5]
    assert hf.norm_before_residual is False and hf.fc_norm is (fmt == "specforge")
    assert hf.num_hidden_layers == (2 if fmt == "modelopt" else 1) and hf.draft_vocab_size == 128


# --- speculators P-EAGLE -------------------------------------------------------------------------


def test_speculators_peagle_converts_with_mask_hidden(tmp_path, verifier, source_writers, same_tensors):
    from spec_format.validate import validate_checkpoint

    src = source_writers["speculators-peagle"](tmp_path / "sp", verifier, mask_token_id=3)
    converted, fmt, _ = convert_to_spec(src, tmp_path / "out", verifier)
    c = converted.config
    assert fmt == "speculators" and c.speculators_model_type == "peagle" and c.mask_token_id == 3
    assert c.norm_before_residual is False and c.speculative_tokens == 4
    assert converted.tensors["mask_hidden"].shape == (1, 3 * 64)
    assert "embed_tokens.weight" in converted.tensors  # trained by speculators' P-EAGLE: kept
    assert validate_checkpoint(tmp_path / "out", verifier).ok
    same_tensors(src, tmp_path / "out", dropped=("verifier_lm_head.weight",))  # the verifier's own head


@pytest.mark.parametrize(
    "break_it, expected",
    [
        ("tensor", "missing tensor 'mask_hidden' (shape [1, 192])"),
        ("mask_token_id", "field 'mask_token_id'"),
        ("norm_output", "field 'norm_output' is true"),
    ],
)
def test_broken_speculators_peagle_is_refused_naming_it(
    tmp_path, verifier, source_writers, break_it, expected
):
    from spec_format.tensors import load_tensors, save_tensors

    src = source_writers["speculators-peagle"](tmp_path / "sp", verifier)
    if break_it == "tensor":
        t = {k: np.array(v) for k, v in load_tensors(src / "model.safetensors").items() if k != "mask_hidden"}
        save_tensors(src / "model.safetensors", t, float_dtype="bfloat16")
    else:
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("mask_token_id") if break_it == "mask_token_id" else cfg.update(norm_output=True)
        (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as e:
        convert_to_spec(src, tmp_path / "out", verifier)
    assert any(expected in p for p in e.value.problems), e.value.problems
    assert not (tmp_path / "out").exists()
