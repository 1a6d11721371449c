"""Servable folders: `glmc convert` and `glmc build --weights` carry the source's tokenizer, chat
template and generation files (byte for byte, into every checkpoint folder and the ONNX
tokenizer), refuse hostile ones by name, and keep the checkpoint's dtype unless --dtype says
otherwise (an fp32 checkpoint stays fp32 through hf and onnx)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import expect_bad_input, hang_guard, run
from safetensors import safe_open

import glmc
import glmc.api
from glmc import presets
from glmc.export.sidecar import CHAT_TEMPLATE_DIR

SIDECARS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
ONNX_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
NEVER = ("README.md", "modeling_glm.py", "pytorch_model.bin", "notes.txt")
CHAT = [{"role": "user", "content": "hello glm world"}]


def _write_tokenizer(folder: Path) -> None:
    """What transformers' save_pretrained writes for a fast tokenizer with a chat template and
    for a generation config, plus files a model folder carries that must never be copied."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", "glm", "<|endoftext|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
        chat_template="{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}<|assistant|>",
    )
    fast.save_pretrained(folder)
    GenerationConfig(eos_token_id=[4], max_new_tokens=7, temperature=0.6, do_sample=True).save_pretrained(
        folder
    )
    (folder / CHAT_TEMPLATE_DIR).mkdir()
    (folder / CHAT_TEMPLATE_DIR / "tool_use.jinja").write_text("{{ messages[0].content }} <|assistant|>")
    (folder / "README.md").write_text("# the source model\n")
    (folder / "modeling_glm.py").write_text("raise SystemExit('remote code ran')\n")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle glmc would ever open")
    (folder / "notes.txt").write_text("not a model file\n")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("servable") / "hf"
    glmc.save_pretrained(glmc.api.build_torch(presets.get("glm-tiny"), dtype=torch.bfloat16), path)
    _write_tokenizer(path)
    assert {p.name for p in path.iterdir()} >= set(SIDECARS)
    return path


def _same_bytes(src: Path, folder: Path, names: tuple[str, ...] = SIDECARS) -> None:
    for name in (*names, f"{CHAT_TEMPLATE_DIR}/tool_use.jinja") if names is SIDECARS else names:
        assert (folder / name).read_bytes() == (src / name).read_bytes(), folder / name
    for name in NEVER:
        assert not (folder / name).exists(), folder / name


def _tokenizer_matches(src: Path, folder: Path) -> None:
    """transformers reads the copied tokenizer and chat template exactly as the source's."""
    from transformers import AutoTokenizer, GenerationConfig

    a, b = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(folder)
    assert a.apply_chat_template(CHAT, tokenize=False) == b.apply_chat_template(CHAT, tokenize=False)
    assert a("hello glm world")["input_ids"] == b("hello glm world")["input_ids"]
    assert GenerationConfig.from_pretrained(folder).max_new_tokens == 7


@pytest.mark.parametrize(
    "pipeline", ["", "fuse-moe", "quantize-fp8", "fuse-moe,shard{ep=2,pp=2},quantize-fp8"]
)
def test_convert_carries_the_sidecar_files(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], pipeline: str
) -> None:
    out = tmp_path / "out"
    code, _, err = run(["convert", ckpt, "-o", out, "--pipeline", pipeline, "--quiet"], capsys)
    assert code == 0, err
    assert "5 tokenizer/generation file(s) carried" in " ".join(err.split())  # rich wraps lines
    folders = [out, *sorted(p for p in out.iterdir() if p.is_dir() and p.name != CHAT_TEMPLATE_DIR)]
    assert len(folders) == (5 if "shard" in pipeline else 1)  # each rank folder is servable on its own
    for f in folders:
        _same_bytes(ckpt, f)
    _tokenizer_matches(ckpt, out)


@pytest.mark.slow  # the onnx export: about two minutes on a 2-core CPU
def test_build_carries_them_into_hf_trtllm_and_onnx(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    code, _, err = run(["build", ckpt, "--weights", ckpt, "-o", out, "--emit", "hf,trtllm,onnx"], capsys)
    assert code == 0, err
    _same_bytes(ckpt, out / "hf")
    _same_bytes(ckpt, out / "trtllm")
    _tokenizer_matches(ckpt, out / "hf")
    # ONNX Runtime GenAI reads the tokenizer beside genai_config.json; generation defaults are
    # genai_config.json's own.
    _same_bytes(ckpt, out / "onnx", ONNX_TOKENIZER)
    assert not (out / "onnx" / "generation_config.json").exists()
    # a quantised, sharded build carries them too (one checkpoint folder per rank)
    code, _, err = run(["build", ckpt, "--weights", ckpt, "-o", tmp_path / "q", "--emit", "hf",
                        "--pipeline", "shard{ep=2},quantize-fp8"], capsys)  # fmt: skip
    assert code == 0, err
    for f in (
        tmp_path / "q" / "hf",
        tmp_path / "q" / "hf" / "pp0-ep0-tp0",
        tmp_path / "q" / "hf" / "pp0-ep1-tp0",
    ):
        _same_bytes(ckpt, f)


def test_build_from_a_preset_writes_no_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["build", "glm-tiny", "-o", tmp_path / "b", "--emit", "hf"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "b" / "hf").iterdir()) == ["config.json", "model.safetensors"]


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _hostile(kind: str, path: Path) -> None:
    if kind == "link":
        path.symlink_to("/etc/passwd")
    elif kind == "sparse":
        with path.open("wb") as f:
            f.truncate(2 * 2**30)  # 2 GiB, holes only
    else:
        os.mkfifo(path)


def test_hostile_extra_files_are_never_opened(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files under names glmc does not carry are not even opened: a link to /etc/passwd, a
    2 GiB sparse file and a fifo beside the weights change nothing."""
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    (src / CHAT_TEMPLATE_DIR).mkdir()
    template = (ckpt / CHAT_TEMPLATE_DIR / "tool_use.jinja").read_bytes()
    (src / CHAT_TEMPLATE_DIR / "tool_use.jinja").write_bytes(template)
    for kind in ("link", "sparse", "fifo"):
        _hostile(kind, src / f"extra-{kind}")
        _hostile(kind, src / CHAT_TEMPLATE_DIR / f"{kind}.txt")  # not a .jinja: not a template
    with hang_guard(120, "a hostile extra file made glmc hang"):
        code, _, err = run(["convert", src, "-o", tmp_path / "c", "--quiet"], capsys)
        assert code == 0, err
        code, _, err = run(["build", src, "--weights", src, "-o", tmp_path / "b", "--emit", "hf"], capsys)
        assert code == 0, err
    for f in (tmp_path / "c", tmp_path / "b" / "hf"):
        _same_bytes(ckpt, f)
        assert not list(f.glob("extra-*")) and sorted(p.name for p in (f / CHAT_TEMPLATE_DIR).iterdir()) == [
            "tool_use.jinja"
        ]


@pytest.mark.parametrize(
    ("kind", "name", "needle"),
    [
        ("link", "tokenizer.model", "symbolic link out of the checkpoint folder"),
        ("sparse", "merges.txt", "over the 134,217,728"),
        ("fifo", "special_tokens_map.json", "not a regular file (a fifo)"),
    ],
)
def test_hostile_file_under_a_carried_name_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, name: str, needle: str
) -> None:
    """Under a name glmc carries, such a file is refused before any work (exit 2, naming it):
    skipping it would publish a folder that cannot be served as the source could."""
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    _hostile(kind, src / name)
    with hang_guard(120, "a hostile sidecar made glmc hang"):
        expect_bad_input(["convert", src, "-o", tmp_path / "c", "--quiet"], capsys, str(src / name), needle)
        expect_bad_input(
            ["build", src, "--weights", src, "-o", tmp_path / "b"], capsys, str(src / name), needle
        )
    assert not (tmp_path / "c").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_hugging_face_cache_links_are_followed(ckpt: Path, tmp_path: Path) -> None:
    """The hub cache's snapshots/REV/NAME -> ../../blobs/HASH links are the usual way a folder
    arrives; their targets are copied."""
    cache = tmp_path / "models--org--glm-tiny"
    snap, blobs = cache / "snapshots" / "abc123", cache / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(x for x in ckpt.iterdir() if x.is_file() and x.name not in NEVER)):
        (blobs / f"blob{i}").write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(f"../../blobs/blob{i}")
    glmc.api.convert(snap, tmp_path / "out")
    _same_bytes(ckpt, tmp_path / "out", ("tokenizer.json", "tokenizer_config.json", "generation_config.json"))
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


# ---- dtype follows the checkpoint --------------------------------------------------------------


def _dtypes(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out |= {h.get_slice(k).get_dtype() for k in h.keys()}  # noqa: SIM118 (no __iter__)
    return out


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "hf"
    spec = presets.get("glm-tiny").model_copy(update={"initializer_range": 0.15})  # clear logit margins
    glmc.save_pretrained(glmc.api.build_torch(spec, dtype=torch.float32, seed=3), path)
    return path


def _onnx_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    import numpy as np
    import onnxruntime as ort

    model = glmc.from_pretrained(folder.parent / "hf")
    past = [t for kv in model.empty_cache(ids.shape[0]) for t in kv]
    pos = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    mask = torch.ones_like(ids)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = [ids, mask, pos, *past]
    out = sess.run(None, {n: np.ascontiguousarray(f.numpy()) for n, f in zip(names, feeds, strict=True)})
    return torch.from_numpy(out[0])


@pytest.mark.slow  # the onnx export: about two minutes on a 2-core CPU
def test_fp32_checkpoint_stays_fp32_through_hf_and_onnx(fp32_ckpt: Path, tmp_path: Path) -> None:
    """`glmc build CKPT --weights CKPT --emit hf,onnx` of an fp32 checkpoint: the hf folder is
    fp32 and the ONNX logits match transformers' within 1e-4 (measured 9.6e-7; with the old
    bf16 default 8.9e-3, which this bound refuses)."""
    import transformers

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = (
            transformers.AutoModelForCausalLM.from_pretrained(fp32_ckpt, dtype=torch.float32)
            .eval()(ids)
            .logits
        )
    out = tmp_path / "b"
    glmc.build(fp32_ckpt, out, weights=fp32_ckpt, emit=["hf", "onnx"])  # --dtype auto
    assert json.loads((out / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    assert json.loads((out / "build.json").read_text())["dtype"] == "f32"
    assert _dtypes(out / "hf") == {"F32"}
    err = _rel(_onnx_logits(out / "onnx", ids), ref)
    print(f"\nONNX (--dtype auto: f32) vs transformers, max |diff| / max |logit|: {err:.2e}")
    assert err < 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_convert_and_build_follow_the_bulk_of_a_mixed_checkpoint(
    fp32_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp32 checkpoint with a few bf16 tensors: auto follows the fp32 bulk; --dtype overrides."""
    from safetensors.torch import load_file, save_file

    src = _copy_checkpoint(fp32_ckpt, tmp_path / "mixed")
    t = load_file(str(src / "model.safetensors"))
    for k in [k for k in t if k.endswith("layernorm.weight")]:
        t[k] = t[k].to(torch.bfloat16)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))  # the bulk wins
    assert run(["convert", src, "-o", tmp_path / "c", "--quiet"], capsys)[0] == 0
    assert _dtypes(tmp_path / "c") == {"F32"}
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "float32"
    assert run(["build", src, "--weights", src, "-o", tmp_path / "b", "--emit", "hf"], capsys)[0] == 0
    assert _dtypes(tmp_path / "b" / "hf") == {"F32"}
    assert run(["convert", src, "-o", tmp_path / "c16", "--quiet", "--dtype", "bf16"], capsys)[0] == 0
    assert _dtypes(tmp_path / "c16") == {"BF16", "F32"}  # F32: the router correction bias alone
    code, out, _ = run(["build", "--help"], capsys)
    assert code == 0 and "most of its weight elements" in " ".join(out.split())
