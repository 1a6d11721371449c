"""The ONNX target in ONNX Runtime: logits, hidden states and presents match glmc's torch model
for prefill (empty past) and decode steps; the MTP graph matches `mtp_cached`; ONNX Runtime
GenAI loads the folder and its greedy tokens equal `glmc generate`'s; the static-cache graphs
(verify_static: a greedy round's first part) match the torch model's static steps; in the
runtime backend only the drafting sessions stop spinning after a run."""

import json

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch

from glmc.cli import main
from glmc.export.steps import kv_names

pytestmark = pytest.mark.slow


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, feeds):
    names = [i.name for i in sess.get_inputs()]
    return [
        torch.from_numpy(o)
        for o in sess.run(
            None, {n: np.ascontiguousarray(f.numpy()) for n, f in zip(names, feeds, strict=True)}
        )
    ]


def test_graph_io_names(built):
    sess = _session(built / "onnx" / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == [
        "input_ids", "attention_mask", "position_ids", *kv_names("past_key_values", 3)
    ]  # fmt: skip
    assert [o.name for o in sess.get_outputs()] == ["logits", "hidden_states", *kv_names("present", 3)]
    mtp = _session(built / "onnx" / "mtp.onnx")
    assert [o.name for o in mtp.get_outputs()] == [
        "logits",
        "hidden_states_out",
        "present.0.key",
        "present.0.value",
    ]


def test_prefill_and_decode_match_torch(built, reference):
    sess = _session(built / "onnx" / "model.onnx")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    past = reference.empty_cache(2)
    onnx_past = [t for kv in past for t in kv]
    for a, b in ((0, 7), (7, 8), (8, 9), (9, 12)):  # prefill with an empty past, then decode/verify
        mask = torch.ones(2, b, dtype=torch.int64)
        with torch.no_grad():
            logits, h, past = reference.forward_cached(ids[:, a:b], pos[:, a:b], past, mask)
        out = _run(sess, [ids[:, a:b], mask, pos[:, a:b].contiguous(), *onnx_past])
        torch.testing.assert_close(out[0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], h, rtol=1e-4, atol=1e-4)
        for got, want in zip(out[2:], [t for kv in past for t in kv], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        onnx_past = out[2:]


def test_mtp_graph_matches_torch(built, reference):
    sess = _session(built / "onnx" / "mtp.onnx")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (1, 9), generator=g)
    h = torch.randn(1, 9, 64, generator=g)
    pos = torch.arange(9)[None]
    past = reference.empty_cache(1, mtp=True)[0]
    onnx_past = list(past)
    for a, b in ((0, 6), (6, 7), (7, 9)):
        mask = torch.ones(1, b, dtype=torch.int64)
        with torch.no_grad():
            logits, z, past = reference.mtp_cached(ids[:, a:b], h[:, a:b], pos[:, a:b], past, mask)
        out = _run(sess, [ids[:, a:b], h[:, a:b].contiguous(), mask, pos[:, a:b].contiguous(), *onnx_past])
        torch.testing.assert_close(out[0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], z, rtol=1e-4, atol=1e-4)
        onnx_past = out[2:]


def test_genai_config(built):
    cfg = json.loads((built / "onnx" / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "decoder"
    assert cfg["search"]["past_present_share_buffer"] is False
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 3 and cfg["model"]["mtp"]["filename"] == "mtp.onnx"


def test_onnxruntime_genai_greedy_equals_glmc_generate(built, capsys):
    prompt = [5, 17, 42, 7, 300, 12]
    new = 24
    model = og.Model(str(built / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    genai_tokens = [int(t) for t in gen.get_sequence(0)][len(prompt) :]
    ids = ",".join(map(str, prompt))
    for extra in ([], ["--speculative", "mtp", "--draft-tokens", "2"]):
        code = main(
            ["generate", str(built / "onnx"), "--prompt-ids", ids, "--max-new-tokens", str(new), *extra]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        assert [int(t) for t in out.splitlines()[0].split(",")] == genai_tokens


def _config_entry(sess, key):
    try:
        return sess.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return None


def test_backend_drafter_stops_spinning_and_the_trunk_keeps_defaults(built):
    """The MTP sessions' thread pools stop spinning when a run returns, so during speculation
    they do not compete for cores with the trunk's verify step, nor the verify graph's with the
    chained drafts it alternates with; the trunk keeps ONNX Runtime's defaults (plain decoding
    unchanged). `threads` sizes the pools."""
    from glmc.runtime import open_artifact
    from glmc.runtime.backend_onnx import FORCE_SPINNING_STOP, OnnxBackend

    backend = open_artifact(built / "onnx").backend
    assert isinstance(backend, OnnxBackend)
    sessions = (backend._decoder, backend._mtp, backend._static, backend._mtp_static, backend._verify_static)
    assert [_config_entry(s, FORCE_SPINNING_STOP) for s in sessions] == [None, "1", None, "1", "1"]
    files = {"decoder": "model.onnx", "mtp": "mtp.onnx"}
    one = OnnxBackend(built / "onnx", backend.spec, files, threads=1)
    assert [s.get_session_options().intra_op_num_threads for s in (one._decoder, one._mtp)] == [1, 1]


def test_static_graph_io_names(built):
    sess = _session(built / "onnx" / "model_static.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "position_ids", *kv_names("cache", 3)]
    assert [o.name for o in sess.get_outputs()] == ["logits", "hidden_states", *kv_names("cache_out", 3)]
    mtp = _session(built / "onnx" / "mtp_static.onnx")
    assert [i.name for i in mtp.get_inputs()] == [
        "input_ids",
        "hidden_states",
        "position_ids",
        *kv_names("cache", 1),
    ]
    verify = _session(built / "onnx" / "verify_static.onnx")
    assert [i.name for i in verify.get_inputs()] == [
        "input_ids",
        "position_ids",
        *kv_names("cache", 3),
        *kv_names("mtp_cache", 1),
    ]
    assert [o.name for o in verify.get_outputs()] == [
        *("best", "accepted", "trunk_ok", "draft", "draft_ok", "mtp_hidden_states"),
        *kv_names("cache_out", 3),
        *kv_names("mtp_cache_out", 1),
    ]
    manifest = json.loads((built / "onnx" / "glmc_runtime.json").read_text())["files"]
    assert manifest["decoder_static"] == "model_static.onnx" and manifest["mtp_static"] == "mtp_static.onnx"
    assert manifest["verify_static"] == "verify_static.onnx"


def test_verify_graph_matches_greedy_verify_static(built, verify_case):
    """verify_static.onnx against `greedy_verify_static` on torch's static caches (conftest's
    VerifyCase: rows accepting 2 and 0 drafts): tokens, counts and flags equal, the MTP hidden
    state and every cache slot close."""
    sess = _session(built / "onnx" / "verify_static.onnx")
    verify_case.check(_run(sess, [verify_case.ids, verify_case.pos, *verify_case.before]))


def test_static_graphs_match_torch_static_steps(built, reference):
    """The static-cache graphs against `forward_static` / `mtp_static` on torch's own static
    cache: logits, hidden states and every updated cache slot, over a prefill of rows of
    different lengths (right-padded), then decode and verify steps at per-row positions."""
    sess = _session(built / "onnx" / "model_static.onnx")
    mtp = _session(built / "onnx" / "mtp_static.onnx")
    g = torch.Generator().manual_seed(2)
    cache = reference.static_cache(2, 24)
    mcache = reference.static_cache(2, 24, mtp=True)[0]
    flat = [t.clone() for kv in cache for t in kv]
    mflat = [t.clone() for t in mcache]
    for width, row_shift in ((7, (0, 0)), (1, (7, 4)), (3, (8, 5))):
        ids = torch.randint(0, 512, (2, width), generator=g)
        pos = (torch.arange(width) + torch.tensor(row_shift)[:, None]).contiguous()
        h = torch.randn(2, width, 64, generator=g)
        with torch.no_grad():
            logits, hidden = reference.forward_static(ids, pos, cache)
            mlogits, z = reference.mtp_static(ids, h, pos, mcache)
        out = _run(sess, [ids, pos, *flat])
        torch.testing.assert_close(out[0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], hidden, rtol=1e-4, atol=1e-4)
        for got, want in zip(out[2:], [t for kv in cache for t in kv], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        mout = _run(mtp, [ids, h, pos, *mflat])
        torch.testing.assert_close(mout[0], mlogits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mout[1], z, rtol=1e-4, atol=1e-4)
        for got, want in zip(mout[2:], mcache, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        flat, mflat = out[2:], mout[2:]


def test_backend_binds_the_static_graphs_and_keeps_the_grown_cache_ids(built):
    """`glmc generate` on an onnx folder runs the static-cache graphs through I/O binding; a
    folder without them (built before they existed) runs the grown-cache graphs as before.
    Both give the same greedy ids for a batch of different lengths, plain and speculative,
    and the bound path's logits equal the grown-cache path's."""
    from glmc.runtime import generate_batch, open_artifact
    from glmc.runtime.backend_onnx import OnnxBackend, OnnxStaticSteps

    static = open_artifact(built / "onnx").backend
    assert isinstance(static, OnnxBackend) and isinstance(static.steps(2, 64), OnnxStaticSteps)
    assert callable(getattr(static.steps(2, 64), "greedy_round", None))  # on verify_static.onnx
    grown = OnnxBackend(built / "onnx", static.spec, {"decoder": "model.onnx", "mtp": "mtp.onnx"})
    assert not grown.static
    # A folder written before verify_static.onnx: three calls a round on the static graphs.
    files = {k: v for k, v in static.files.items() if k != "verify_static"}
    three_calls = OnnxBackend(built / "onnx", static.spec, files)
    assert three_calls.static and getattr(three_calls.steps(2, 64), "greedy_round", None) is None
    prompts = [[5, 17, 42, 7, 300, 12, 99], [8], [400, 3, 3, 250]]
    for k in (0, 2):
        want, _ = generate_batch(grown, prompts, 12, draft_tokens=k)
        got, _ = generate_batch(static, prompts, 12, draft_tokens=k)
        assert got == want, k
        again, _ = generate_batch(static, prompts, 12, draft_tokens=k)  # reused buffers
        assert again == want, k
        assert generate_batch(three_calls, prompts, 12, draft_tokens=k)[0] == want, k
    ids = torch.tensor([[5, 17, 42], [8, 0, 0]])
    pos = torch.arange(3).expand(2, 3).contiguous()
    a, ha = static.steps(2, 64).trunk(ids, pos, prefill=True)
    b, hb = grown.steps(2, 64).trunk(ids, pos, prefill=True)
    # Row 1's padded positions see different (masked vs stale) slots: compare its real token.
    for x, y in ((a, b), (ha, hb)):
        torch.testing.assert_close(x[0], y[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x[1, :1], y[1, :1], rtol=1e-5, atol=1e-5)
