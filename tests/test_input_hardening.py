"""Hostile or careless input (issue 13, input side): every case is refused with exit 2 and one
short printable line naming the field, key or file, never a traceback, a hang or an allocation
that runs the machine out of memory. Python API callers get a `GlmcError` (SpecError)."""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_helpers import hang_guard  # tests/cli_helpers.py

import glmc
from glmc import ModelSpec, SpecError, presets, resources
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.untrusted import MESSAGE_CHARS, one_line, printable

HANG_GUARD_S = 60  # turns a hang into a failure; far above what any case here takes


def no_hang(seconds: int = HANG_GUARD_S) -> AbstractContextManager[None]:
    return hang_guard(seconds)


def cli(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with no_hang():
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(argv: list[Any], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one printable line on stderr holding every needle."""
    code, _, err = cli(argv, capsys)
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and len(lines[0]) <= MESSAGE_CHARS + 40, err
    assert lines[0].startswith("glmc: error: ") and "\x1b" not in err and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tiny() -> dict[str, Any]:
    return presets.get("glm-tiny").model_dump(mode="json")


def hf_tiny() -> dict[str, Any]:
    return presets.get("glm-tiny").to_hf_config()


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


# ---- 4: YAML alias bomb ---------------------------------------------------------------------------

BOMB = """\
    scaling:
      a: &a [x, x, x, x, x, x, x, x, x]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


def bomb_spec(tmp_path: Path) -> Path:
    """glm-tiny with an attention.rope.scaling that expands to 9^8 = 43 million strings."""
    text = yaml.safe_dump(tiny(), sort_keys=False)
    assert text.count("    scaling: null\n") == 1
    p = tmp_path / "bomb.yaml"
    p.write_text(text.replace("    scaling: null\n", BOMB))
    return p


@pytest.mark.parametrize("verb", ["inspect", "build"])
def test_alias_bomb_in_rope_scaling_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    spec = bomb_spec(tmp_path)
    assert "*g, *g" in spec.read_text() and yaml.safe_load(spec.read_text())["attention"]["rope"]["scaling"]
    argv = ["inspect", spec, "--json"] if verb == "inspect" else ["build", spec, "-o", tmp_path / "out"]
    refused(argv, capsys, "bomb.yaml", "expands to more than 100,000 values")
    assert not (tmp_path / "out").exists()


def test_shared_references_from_python_are_bounded_too() -> None:
    """The same bomb built in Python (shared lists), handed to the API."""
    x: list[Any] = ["x"] * 9
    for _ in range(8):
        x = [x] * 9
    d = tiny()
    d["attention"]["rope"]["scaling"] = {"h": x}
    with no_hang(), pytest.raises(SpecError, match="more than 100,000 values"):
        ModelSpec.from_dict(d)
    cyclic: dict[str, Any] = {"rope_type": "yarn"}
    cyclic["self"] = cyclic
    d["attention"]["rope"]["scaling"] = cyclic
    with no_hang(), pytest.raises(SpecError, match="nested deeper than 32 levels"):
        ModelSpec.from_dict(d)


def test_real_rope_scaling_dicts_still_load() -> None:
    d = tiny()
    for scaling in (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        {"rope_type": "longrope", "long_factor": [1.0] * 16, "short_factor": [1] * 16},
    ):
        d["attention"]["rope"]["scaling"] = scaling
        assert ModelSpec.from_dict(d).attention.rope.scaling == scaling


@pytest.mark.parametrize(
    ("scaling", "needle"),
    [
        ({"rope_type": "yarn", "factor": {"nested": 1}}, "factor is a dict"),
        ({"factor": float("inf")}, "factor is inf"),
        ({"long_factor": [1.0, float("nan")]}, "long_factor must list finite numbers"),
        ({"long_factor": [1.0] * 5000}, "at most 4096"),
        ({"rope\x1b[2J": 1}, "not a short printable string"),
    ],
)
def test_bad_rope_scaling_is_refused_by_name(scaling: dict[str, Any], needle: str) -> None:
    d = tiny()
    d["attention"]["rope"]["scaling"] = scaling
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict(d)
    assert "attention.rope.scaling" in str(e.value) and needle in str(e.value)


# ---- 5: absurd sizes and the memory guard ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("moe", "num_experts"), 10**12, "moe.num_experts"),
        (("hidden_size",), 2**40, "hidden_size"),
        (("vocab_size",), 2**40, "vocab_size"),
        (("num_layers",), 10**6, "num_layers"),
        (("attention", "head_dim"), 2**20, "attention.head_dim"),
        (("mlp", "intermediate_size"), 2**40, "mlp.intermediate_size"),
        (("max_position_embeddings",), 2**62, "max_position_embeddings"),
    ],
)
def test_absurd_sizes_are_refused_by_the_spec_validator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: tuple[str, ...], value: int, field: str
) -> None:
    d = tiny()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        ModelSpec.from_dict(d)
    refused(["inspect", write(tmp_path / "s.yaml", d)], capsys, field, "less than or equal")


def test_inspect_of_glm45_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["inspect", "glm-4.5", "--json"], capsys)
    assert code == 0 and json.loads(out)["params"]["total"] == 355_234_006_336


def fake_memory(monkeypatch: pytest.MonkeyPatch, gib: float) -> None:
    monkeypatch.setattr(resources, "available_bytes", lambda: int(gib * 2**30))
    monkeypatch.delenv(resources.SKIP_ENV, raising=False)


def test_build_glm45_on_a_24gb_machine_is_refused_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_memory(monkeypatch, 21.5)  # what a 24 GB machine reports as available
    msg = refused(
        ["build", "glm-4.5", "-o", tmp_path / "x"], capsys, "glm-4.5 needs about", "664.6 GiB of bf16 weights"
    )
    assert "21.5 GiB available" in msg and "glmc inspect" in msg and "GLMC_SKIP_MEMORY_CHECK" in msg
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary
    refused(["build", "glm-4.5", "-o", tmp_path / "x", "--dtype", "f32"], capsys, "1.3 TiB of f32 weights")


def test_memory_estimate_matches_the_model_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights term is exactly what the torch model holds; the guard passes what fits."""
    spec = presets.get("glm-small")
    model = glmc.api.build_torch(spec, dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    weights, temp = resources.model_bytes(glmc.lower.lower(spec, dtype="bf16"))
    assert weights == held and temp > 0
    fake_memory(monkeypatch, (weights + temp + resources.BASELINE_BYTES) / 2**30 + 0.01)
    resources.check_model(spec, "bf16", "glmc build")  # fits: no error
    fake_memory(monkeypatch, (weights + temp + resources.BASELINE_BYTES) / 2**30 - 0.01)
    with pytest.raises(GlmcError, match="glm-small needs about"):
        resources.check_model(spec, "bf16", "glmc build")
    monkeypatch.setenv(resources.SKIP_ENV, "1")
    resources.check_model(spec, "bf16", "glmc build")  # the documented way around it


def test_build_with_weights_is_guarded_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "ckpt"
    glmc.save_pretrained(glmc.api.build_torch(presets.get("glm-tiny")), src)
    fake_memory(monkeypatch, 0.1)
    refused(
        ["build", src, "--weights", src, "-o", tmp_path / "out"],
        capsys,
        "read whole from the checkpoint",
        "glmc convert",
    )
    assert not (tmp_path / "out").exists()


def test_train_entry_is_guarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_memory(monkeypatch, 21.5)
    (tmp_path / "data.txt").write_text("hello world " * 100)
    refused(
        ["train", "glm-4.5-air", "--data", tmp_path / "data.txt", "-o", tmp_path / "run", "--no-compile"],
        capsys,
        "glmc train: glm-4.5-air needs at least",
        "fp32 weights",
    )


def test_available_memory_is_read_from_proc_meminfo() -> None:
    avail = resources.available_bytes()
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        assert avail is None
        return
    total = (
        int(next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemTotal:")).split()[1])
        * 1024
    )
    assert avail is not None and 0 < avail <= total


# ---- 6: the plan glmc's own message suggested -------------------------------------------------------


def test_huge_expert_parallel_plan_is_refused_not_hung(capsys: pytest.CaptureFixture[str]) -> None:
    refused(
        ["inspect", "glm-4.5", "--pipeline", "shard{ep=1000000000,redundant_experts=999999992}"],
        capsys,
        "1000000000 ranks exceeds 1048576",
    )


# ---- 10, 18: Hugging Face config.json types --------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads must be positive"),
        ({"num_attention_heads": "4"}, "num_attention_heads must be an integer, got '4' (a string)"),
        ({"rope_parameters": "abc"}, "rope_parameters must be an object or null, got 'abc'"),
        ({"quantization_config": "garbage"}, "quantization_config must be an object or null"),
        ({"quantization_config": {"quant_method": 8}}, "quantization_config.quant_method must be a string"),
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64' (a string)"),
        ({"num_hidden_layers": None}, "num_hidden_layers must be an integer, got null"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got true (a boolean)"),
        ({"num_hidden_layers": 3.0}, "num_hidden_layers must be an integer, got 3.0 (a number)"),
        ({"use_qk_norm": "yes"}, "use_qk_norm must be true or false"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number"),
        ({"eos_token_id": "2"}, "eos_token_id must be an integer, a list of integers or null"),
        ({"_name_or_path": ["x"]}, "_name_or_path must be a string"),
        ({"rope_parameters": {"rope_theta": "1e6"}}, "rope_parameters.rope_theta must be a finite number"),
    ],
)
def test_hf_config_types_are_checked_by_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], update: dict[str, Any], needle: str
) -> None:
    cfg = {**hf_tiny(), **update}
    cfg = {k: v for k, v in cfg.items() if not (k == "head_dim" and v is None)}
    with pytest.raises(SpecError) as e:
        ModelSpec.from_hf_config(cfg)
    assert needle in str(e.value)
    refused(["inspect", write(tmp_path / "config.json", cfg)], capsys, needle)


def test_hf_config_keys_left_out_still_take_transformers_defaults() -> None:
    cfg = hf_tiny()
    for key in ("head_dim", "num_nextn_predict_layers", "pad_token_id", "rope_parameters", "rope_scaling"):
        cfg.pop(key)
    s = ModelSpec.from_hf_config(cfg)
    assert s.attention.head_dim == 64 // 4 and s.num_mtp_layers == 0 and s.tokens.pad_token_id is None


# ---- 11: deep nesting ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_deeply_nested_spec_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    p = tmp_path / f"deep{suffix}"
    depth = 100_000
    p.write_text('{"a": ' * depth + "1" + "}" * depth if suffix == ".json" else "[" * depth + "]" * depth)
    refused(["inspect", p], capsys, p.name, "nested")


# ---- 17: non-finite numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("attention", "rope", "theta"), "attention.rope.theta"),
        (("moe", "routed_scaling_factor"), "moe.routed_scaling_factor"),
        (("initializer_range",), "initializer_range"),
        (("norm_eps",), "norm_eps"),
    ],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: tuple[str, ...], field: str, value: str
) -> None:
    d = tiny()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = 1.5  # a marker replaced by the YAML spelling of the non-finite value
    text = yaml.safe_dump(d).replace(": 1.5\n", f": {value}\n")
    p = tmp_path / "s.yaml"
    p.write_text(text)
    refused(["inspect", p], capsys, field)


@pytest.mark.parametrize(
    ("key", "token"), [("rope_theta", "Infinity"), ("routed_scaling_factor", "NaN"), ("rope_theta", "1e400")]
)
def test_non_finite_numbers_in_config_json_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, token: str
) -> None:
    cfg = hf_tiny()
    cfg[key] = 12345.5
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg).replace("12345.5", token))
    refused(["inspect", p], capsys, "config.json")


def test_written_config_json_is_strict_json() -> None:
    """What glmc writes parses with a JSON reader that refuses NaN/Infinity."""
    text = json.dumps(presets.get("glm-4.5").to_hf_config(), allow_nan=False)
    assert ModelSpec.from_hf_config(json.loads(text)) == presets.get("glm-4.5")


# ---- 18: duplicate keys, no coercion ---------------------------------------------------------------


def test_duplicate_keys_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps(tiny())
    p = tmp_path / "s.json"
    p.write_text(text.replace('"num_layers": 3', '"num_layers": 3, "num_layers": 2'))
    refused(["inspect", p], capsys, "duplicate key num_layers")
    y = tmp_path / "s.yaml"
    y.write_text(yaml.safe_dump(tiny()).replace("num_layers: 3\n", "num_layers: 3\nnum_layers: 2\n"))
    refused(["inspect", y], capsys, "duplicate key num_layers at line")
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(hf_tiny()).replace('"hidden_size": 64', '"hidden_size": 64, "hidden_size": 128')
    )
    refused(["inspect", cfg], capsys, "duplicate key hidden_size")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("num_layers", True, "num_layers: Input should be a valid integer, got true (a boolean)"),
        ("num_layers", "3", "num_layers: Input should be a valid integer, got '3' (a string)"),
        ("num_layers", 3.0, "num_layers: Input should be a valid integer, got 3.0 (a number)"),
        ("tie_word_embeddings", 1, "tie_word_embeddings: Input should be a valid boolean"),
        ("name", 7, "name: Input should be a valid string"),
        ("moe", "null", "moe: Input should be a valid dictionary"),
    ],
)
def test_no_coercion_in_spec_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, needle: str
) -> None:
    d = tiny()
    d[key] = value
    refused(["inspect", write(tmp_path / "s.yaml", d)], capsys, needle.split(",")[0])
    with pytest.raises(SpecError, match=needle.split(",")[0]):
        ModelSpec.from_dict(d)


# ---- 21: control characters in names ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["\x1b[2J\x1b[31mred", "a\x1b]0;title\x07", "left\u202eright", "two\nlines"])
def test_name_with_control_characters_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    d = {**tiny(), "name": name}
    for verb in (["inspect"], ["build"]):
        argv = [*verb, write(tmp_path / "s.yaml", d)] + (
            ["-o", tmp_path / "out"] if verb == ["build"] else []
        )
        refused(argv, capsys, "name:", "control or format characters")
    cfg = {**hf_tiny(), "_name_or_path": name}
    refused(["inspect", write(tmp_path / "config.json", cfg)], capsys, "control or format characters")


def test_rich_markup_in_a_name_is_printed_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = {**tiny(), "name": "[bold red]x[/bold red] [link=http://e.invalid]y"}
    code, out, _ = cli(["inspect", write(tmp_path / "s.yaml", d)], capsys)
    assert code == 0 and "[bold red]x[/bold red]" in " ".join(out.split())


def test_printable_escapes_terminal_sequences() -> None:
    assert printable("a\x1b[31mb\u202ec") == "a\\x1b[31mb\\u202ec"
    assert printable("plain café") == "plain café"


# ---- 22: message size ------------------------------------------------------------------------------


def test_100000_digit_argument_gives_a_short_message(capsys: pytest.CaptureFixture[str]) -> None:
    refused(
        ["inspect", "glm-tiny", "--pipeline", "shard{ep=" + "9" * 100_000 + "}"], capsys, "is not a valid int"
    )


def test_100000_digit_number_in_a_spec_gives_a_short_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for suffix in (".json", ".yaml"):
        p = tmp_path / f"s{suffix}"
        text = json.dumps(tiny()) if suffix == ".json" else yaml.safe_dump(tiny())
        p.write_text(text.replace("64", "9" * 100_000, 1))
        refused(["inspect", p], capsys, p.name)


def test_yaml_parse_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\nb: {c: d\n  - e\n")
    refused(["inspect", p], capsys, "bad.yaml: cannot parse YAML at line")
    p.write_text("a: *undefined\n")
    refused(["inspect", p], capsys, "cannot parse YAML", "undefined")


def test_any_long_or_multiline_error_is_clipped_to_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(_spec: object, **_kw: object) -> None:
        raise GlmcError("first line\nsecond line \x1b[31m" + "x" * 100_000)

    monkeypatch.setattr(glmc.api, "inspect", boom)
    msg = refused(["inspect", "glm-tiny"], capsys, "first line; second line \\x1b[31m", "more chars")
    assert len(msg) <= MESSAGE_CHARS + len("glmc: error: ")
    assert one_line("a\n\n  b\t c\rd") == "a; b c\\rd"


def test_argparse_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    refused(["inspect", "--seq-len", "many"], capsys, "--seq-len", "glmc inspect --help")
    refused(["no-such-verb"], capsys, "invalid choice")


def test_a_file_that_is_not_a_regular_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)  # reading it would block
    refused(["inspect", fifo], capsys, "spec.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("a: 1\n" * 1_000_000)
    refused(["inspect", big], capsys, "the most glmc reads for a spec or config file")
