"""Fuzzing the input side of the CLI: spec files, Hugging Face config.json files and pipeline
texts, mutated with hostile values (wrong types, NaN and infinities, huge and negative numbers,
control characters, deep and unknown keys, broken JSON/YAML text). Whatever the input, `glmc`
either succeeds (exit 0, nothing on stderr) or refuses it (exit 2, one printable line on
stderr); an exception out of `glmc.cli.main` or a hang fails the test.

Each case runs under an alarm (CASE_BOUND_S), which turns a hang into a failure without timing
anything that passes. Examples are derandomized (the same on every run) and their number is set
here, not by the suite's Hypothesis profile: 3 x 200 cases per run.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import hang_guard  # tests/cli_helpers.py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmc import presets
from glmc.cli import main
from glmc.untrusted import MESSAGE_CHARS

CASE_BOUND_S = 30
EXAMPLES = 200
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,  # the alarm bounds each case; a deadline would flake on a loaded machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def bounded(seconds: int = CASE_BOUND_S) -> AbstractContextManager[None]:
    return hang_guard(seconds, "one fuzz case hung")


def check_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> int:
    capsys.readouterr()
    with bounded():
        code = main(argv)
    _, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 0:
        assert err == "", err
        return code
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("glmc: error: ") and len(lines[0]) <= MESSAGE_CHARS + 20, lines[0]
    assert lines[0].isprintable(), repr(lines[0])
    return code


# ---- hostile values ---------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 3, 7, 8, 64, 127, 128, 2**16, 2**16 + 1, 2**31, 2**63, -(2**63), 10**12, 10**30]
CONTROL = ["\x1b[2J", "\x07", "\x00", "\u202e", "\n", "\r", "\t", "\x9b"]
odd_text = st.one_of(
    st.sampled_from(["", "64", "1e400", "nan", "Infinity", "silu", "glm4_moe", "[x]", "[bold]b"]),
    st.lists(st.sampled_from(["a", "-", "0", " ", "{", "=", "é", *CONTROL]), max_size=8).map("".join),
)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(-3, 300),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.5, 1e-300, 1e300, 2.5]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    odd_text,
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)),
    max_leaves=12,
)


def paths(d: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(paths(v, (*prefix, k)))
    return out


def mutate(base: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    d = json.loads(json.dumps(base))
    known = paths(d)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["set", "set", "set", "delete", "add"]), label="kind")
        path = data.draw(st.sampled_from(known), label="path")
        parent = d
        for key in path[:-1]:
            nxt = parent.get(key)
            if not isinstance(nxt, dict):
                break
            parent = nxt
        else:
            if kind == "delete":
                parent.pop(path[-1], None)
            elif kind == "add":
                parent[data.draw(odd_text, label="new key")] = data.draw(value, label="new value")
            else:
                parent[path[-1]] = data.draw(st.one_of(like(parent.get(path[-1])), value), label="value")
    return d


def like(old: Any) -> st.SearchStrategy[Any]:
    """Values of the same JSON type as `old`: wrong sizes and combinations rather than wrong types."""
    if isinstance(old, bool):
        return st.booleans()
    if isinstance(old, int):
        return st.one_of(st.integers(-2, max(2 * old + 2, 2)), st.sampled_from(EDGE_INTS))
    if isinstance(old, float):
        return st.floats(allow_nan=True, allow_infinity=True)
    if isinstance(old, str):
        return odd_text
    return value


def serialise(d: dict[str, Any], fmt: str, data: st.DataObject) -> str:
    if fmt == "yaml":
        text = yaml.safe_dump(d, allow_unicode=True)
    else:
        text = json.dumps(d)  # writes NaN/Infinity tokens for non-finite floats, as Python does
    damage = data.draw(
        st.sampled_from(["none", "none", "none", "truncate", "duplicate", "alias"]), label="damage"
    )
    if damage == "truncate":
        text = text[: data.draw(st.integers(0, len(text)), label="cut")]
    elif damage == "duplicate" and fmt == "json":
        text = text.replace('"hidden_size": ', '"hidden_size": 1, "hidden_size": ', 1)
    elif damage == "duplicate":
        text = text + "hidden_size: 1\n"
    elif damage == "alias" and fmt == "yaml":
        text = (
            "x: &x [a, a, a, a, a, a, a, a]\n"
            + "".join(
                f"x{i}: &x{i} [{', '.join(['*x' if i == 0 else f'*x{i - 1}'] * 8)}]\n" for i in range(7)
            )
            + text
        )
    return text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---- the three fuzzers ------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["yaml", "json"]), verb=st.sampled_from(["inspect", "ir"]))
def test_fuzz_spec_files(
    workdir: Path, capsys: pytest.CaptureFixture[str], data: st.DataObject, fmt: str, verb: str
) -> None:
    base = presets.get(data.draw(st.sampled_from(["glm-tiny", "glm-small"]), label="preset"))
    spec = mutate(base.model_dump(mode="json"), data)
    path = workdir / f"spec.{fmt}"
    path.write_text(serialise(spec, fmt, data))
    argv = ["inspect", str(path), "--json"] if verb == "inspect" else ["ir", str(path)]
    check_cli(argv, capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_hf_configs(workdir: Path, capsys: pytest.CaptureFixture[str], data: st.DataObject) -> None:
    cfg = mutate(presets.get("glm-tiny").to_hf_config(), data)
    folder = workdir / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(serialise(cfg, "json", data))
    target = data.draw(st.sampled_from([folder, folder / "config.json"]), label="as")
    check_cli(["inspect", str(target), "--json"], capsys)


PASS_ARGS = {
    "fuse-moe": [],
    "shard": [
        "dp",
        "tp",
        "ep",
        "pp",
        "redundant_experts",
        "expert_load",
        "balance",
        "kv_replication",
        "seq_len",
    ],
    "quantize-fp8": ["recipe", "exclude", "strict", "serving"],
}
arg_value = st.one_of(
    st.sampled_from(["1", "2", "4", "8", "3", "0", "-1", "16", "64", "1000000000", "99999999999999999999"]),
    st.sampled_from(
        ["true", "false", "flops", "params", "block128", "channel", "*.mlp.*", "/dev/null", "1_0"]
    ),
    st.integers(-2, 70).map(str),
    odd_text,
)


small_int = st.sampled_from(["1", "2", "4", "8", "2", "4", "16", "3"])
PLAUSIBLE = {
    **dict.fromkeys(["dp", "tp", "ep", "pp", "redundant_experts", "seq_len"], small_int),
    **dict.fromkeys(["kv_replication", "strict", "serving"], st.sampled_from(["true", "false"])),
    "balance": st.sampled_from(["flops", "params"]),
    "recipe": st.sampled_from(["block128", "channel"]),
    "exclude": st.sampled_from(["", "*.shared_experts.*", "model.layers.1.*|*.q_proj.*", "nothing.*"]),
    "expert_load": st.just(""),
}


@st.composite
def pipelines(draw: st.DrawFn) -> str:
    """Mostly well-formed pipelines (passes in order, their own arguments, plausible values),
    so the passes themselves run; some with unknown names, wrong values or broken syntax."""
    if draw(st.integers(0, 4)):
        names = [n for n in PASS_ARGS if draw(st.booleans())]
    else:
        names = draw(st.lists(st.sampled_from([*PASS_ARGS, "no-such-pass", ""]), max_size=4))
    parts = []
    for name in names:
        own = PASS_ARGS.get(name, [])
        args = draw(st.lists(st.sampled_from(own), max_size=3, unique=True)) if own else []
        if not draw(st.integers(0, 9)):
            args.append("bogus")
        body = ",".join(
            f"{a}={draw(PLAUSIBLE[a] if a in PLAUSIBLE and draw(st.integers(0, 3)) else arg_value)}"
            for a in args
        )
        parts.append(name + (f"{{{body}}}" if args or not draw(st.integers(0, 4)) else ""))
    text = ",".join(parts)
    if not draw(st.integers(0, 4)):  # raw damage: a character inserted somewhere
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(["{", "}", ",", "=", ";", " ", "\x1b", "é"])) + text[pos:]
    return text


@FUZZ
@given(pipeline=pipelines(), spec=st.sampled_from(["glm-tiny", "glm-small"]))
def test_fuzz_pipelines(capsys: pytest.CaptureFixture[str], pipeline: str, spec: str) -> None:
    check_cli(["inspect", spec, f"--pipeline={pipeline}", "--json"], capsys)
