"""The static-cache decode runtime: static-cache steps against the functional KV cache,
batched generation (prompts of different lengths, per-row EOS and budget, per-row MTP
acceptance) against each prompt decoded alone, compiled steps against eager ones, on the torch
backend and the exported graphs, and `glmc generate --prompt-file`."""

from types import SimpleNamespace

import pytest
import torch

from glmc.cli import main
from glmc.errors import GlmcError
from glmc.runtime import Stats, generate, generate_batch, open_artifact
from glmc.runtime.backend import TorchBackend
from glmc.runtime.cpu import fast_bf16

# Different lengths, so rows start, verify and stop at different positions.
PROMPTS = [[5, 17, 42, 7, 300, 12, 99], [8], [400, 3, 3, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _alone(backend, prompts, n, k=0, eos=()):
    return [generate(backend, p, n, draft_tokens=k, eos_token_ids=eos)[0] for p in prompts]


def test_static_cache_steps_match_the_functional_cache(make_tiny):
    """forward_static over a preallocated cache (rows at different positions) gives the logits
    and hidden states of forward_cached over each row's own growing cache."""
    m = make_tiny()
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 512, (1, 9), generator=g)
    b = torch.randint(0, 512, (1, 9), generator=g)
    with torch.no_grad():
        want = []
        for row, split in ((a, 6), (b, 3)):
            past = m.empty_cache(1)
            pos = torch.arange(9)[None]
            l1, h1, past = m.forward_cached(row[:, :split], pos[:, :split], past)
            l2, h2, _ = m.forward_cached(row[:, split : split + 2], pos[:, split : split + 2], past)
            want.append((l1, h1, l2, h2))
        cache = m.static_cache(2, 32)
        # prefill: both rows right-padded to 6 tokens; row b's padding sits past its 3 tokens
        ids = torch.cat((a[:, :6], torch.cat((b[:, :3], torch.zeros(1, 3, dtype=torch.int64)), 1)))
        lp, hp = m.forward_static(ids, torch.arange(6).expand(2, 6), cache)
        # next step: 2 tokens per row at each row's own positions (6, 7 and 3, 4)
        ids2 = torch.cat((a[:, 6:8], b[:, 3:5]))
        pos2 = torch.tensor([[6, 7], [3, 4]])
        ld, hd = m.forward_static(ids2, pos2, cache)
    torch.testing.assert_close(lp[0:1], want[0][0])
    torch.testing.assert_close(hp[0:1], want[0][1])
    torch.testing.assert_close(lp[1:2, :3], want[1][0])
    torch.testing.assert_close(ld[0:1], want[0][2])
    torch.testing.assert_close(hd[1:2], want[1][3])
    torch.testing.assert_close(ld[1:2], want[1][2])


@pytest.mark.parametrize("k", [0, 2])
def test_batched_greedy_equals_each_prompt_alone(reference, k):
    backend = TorchBackend(reference, reference.spec)
    want = _alone(backend, PROMPTS, 14, k)
    got, stats = generate_batch(backend, PROMPTS, 14, draft_tokens=k)
    assert got == want
    assert stats.batch == 4 and stats.new_tokens == 4 * 14
    assert stats.prompt_tokens == sum(map(len, PROMPTS))


def test_rows_stop_at_their_own_eos(reference):
    """An EOS that one row reaches early: that row stops there (EOS kept), the others go on,
    each exactly as when decoded alone with the same EOS, plain and speculative."""
    backend = TorchBackend(reference, reference.spec)
    first = generate(backend, PROMPTS[0], 14)[0]
    eos = (first[3],)
    for k in (0, 3):
        want = _alone(backend, PROMPTS, 14, k, eos)
        got, _ = generate_batch(backend, PROMPTS, 14, draft_tokens=k, eos_token_ids=eos)
        assert got == want
        assert got[0] == first[: first.index(eos[0]) + 1]
        assert any(len(o) == 14 for o in got)  # a row without that token runs to its budget


def test_batched_speculation_accepts_per_row(make_tiny):
    """Rows accept different numbers of drafts per round (an MTP layer that agrees with the
    trunk on part of the vocabulary), yet each row's output is its plain greedy output."""
    from test_generate import _markov_model  # tests/deploy is on sys.path (no __init__.py)

    m, _, _ = _markov_model(make_tiny, mtp_noise=0.02)
    backend = TorchBackend(m, m.spec)
    want = _alone(backend, PROMPTS, 30)
    got, stats = generate_batch(backend, PROMPTS, 30, draft_tokens=3)
    assert got == want
    assert 1 in stats.accepted_per_round and 4 in stats.accepted_per_round


def test_catch_up_at_one_position_equals_the_full_catch_up(make_tiny):
    """The round's MTP catch-up writes k, v at every position but runs attention's output,
    the MoE and the norm only at each row's index `at`: the same hidden state there, and the
    same cache, as the layer run at every position."""
    from glmc.export.torch.model import static_attention_mask

    m = make_tiny()
    g = torch.Generator().manual_seed(2)
    hidden = m.model.norm.weight.shape[0]
    ids = torch.randint(0, 512, (3, 4), generator=g)
    h = torch.randn(3, 4, hidden, generator=g)
    pos = torch.tensor([[5, 6, 7, 8], [0, 1, 2, 3], [9, 10, 11, 12]])
    at = torch.tensor([2, 0, 3])
    mtp = m.model.mtp[0]
    with torch.no_grad():
        outs = []
        for where in (None, at):
            cache = m.static_cache(3, 16, mtp=True)[0]
            for kv in cache:
                kv.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(7)))
            mask = static_attention_mask(pos, 16)
            emb = m.model.embed_tokens(ids)
            z = mtp.forward_mtp_static(emb, h, m.model.rope(pos), cache, pos, mask, where)
            outs.append((z, cache))
    (full, full_cache), (part, part_cache) = outs
    assert part.shape == (3, 1, hidden)
    torch.testing.assert_close(part[:, 0], full[torch.arange(3), at])
    for a, b in zip(full_cache, part_cache, strict=True):
        assert torch.equal(a, b)


class _ThreeCalls:
    """A torch backend's steps without `greedy_round`: greedy speculation then runs the
    three-call loop (verify, catch-up, chained drafts), as it does on the exported graphs."""

    def __init__(self, backend):
        self.backend = backend
        self.name, self.spec, self.max_batch = backend.name, backend.spec, backend.max_batch
        self.has_mtp = backend.has_mtp

    def steps(self, batch, length):
        inner = self.backend.steps(batch, length)
        return SimpleNamespace(trunk=inner.trunk, mtp=inner.mtp, warm_up=inner.warm_up)

    def forget_steps(self, batch, length):
        self.backend.forget_steps(batch, length)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_call_rounds_equal_the_three_call_loop(make_tiny, k):
    """GLMForCausalLM.greedy_round_static (verify, acceptance, catch-up and next drafts in one
    call) commits the same tokens in the same rounds as the three-call loop, rows accepting
    different numbers of drafts."""
    from test_generate import _markov_model  # tests/deploy is on sys.path (no __init__.py)

    m, _, _ = _markov_model(make_tiny, mtp_noise=0.02)
    fused = TorchBackend(m, m.spec)
    assert hasattr(fused.steps(1, 64), "greedy_round")
    want, st_want = generate_batch(_ThreeCalls(fused), PROMPTS, 30, draft_tokens=k)
    got, st = generate_batch(fused, PROMPTS, 30, draft_tokens=k)
    assert got == want == _alone(fused, PROMPTS, 30)
    assert st.accepted_per_round == st_want.accepted_per_round and st.rounds == st_want.rounds
    assert 1 in st.accepted_per_round and k + 1 in st.accepted_per_round


def test_one_call_rounds_refuse_nonfinite_verify_logits(make_tiny):
    """A draft whose embedding is NaN: the round's verify logits are NaN (the draft's own, and,
    through attention's 0 * NaN over its cache slot, its neighbour's), and both loops refuse
    them naming the same position (the prefill and the draft's logits are finite)."""
    from test_generate import _markov_model

    m, f, g = _markov_model(make_tiny, mtp_noise=0.0)
    prompt = [5]
    first = f[prompt[0]]
    d1 = g[first]
    assert d1 not in (prompt[0], first)
    with torch.no_grad():
        m.model.embed_tokens.weight[d1] = float("nan")
    fused = TorchBackend(m, m.spec)
    messages = []
    for backend in (fused, _ThreeCalls(fused)):
        with pytest.raises(GlmcError, match=r"trunk logits at position \d hold NaN or Inf") as e:
            generate(backend, prompt, 8, draft_tokens=1)  # no chained draft reads d1
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    # The refusal dropped the poisoned caches: a prompt whose tokens stay finite decodes.
    with torch.no_grad():
        m.model.embed_tokens.weight[d1] = 0.0
    assert generate(fused, prompt, 8)[0] == generate(TorchBackend(m, m.spec), prompt, 8)[0]


def test_sampled_batch_is_seeded(reference):
    from glmc.runtime import Sampling

    backend = TorchBackend(reference, reference.spec)
    s = Sampling(greedy=False, temperature=0.8, top_p=0.9, seed=4)
    a, _ = generate_batch(backend, PROMPTS, 10, s, draft_tokens=2)
    b, _ = generate_batch(backend, PROMPTS, 10, s, draft_tokens=2)
    assert a == b and [len(o) for o in a] == [10] * 4


def test_stats_of_a_batch():
    st = Stats(new_tokens=4 * 10, batch=4, decode_s=2.0, accepted_per_round=[1, 2, 3])
    assert st.decode_tokens_per_s == 18.0  # 36 tokens after each row's first, in 2 s
    assert st.mean_acceptance_length == 2.0


def test_the_mtp_pass_over_the_prompt_counts_as_prefill(reference, monkeypatch):
    """Speculation starts with the MTP layer over the whole prompt: prompt work, timed with the
    trunk's prefill, not in decode tokens/s. A fake clock that only the steps advance: each
    prefill call costs 1 s, each fixed-shape call 1 ms."""
    import glmc.runtime.decode as decode
    from glmc.runtime.steps import TorchSteps

    now = [0.0]
    monkeypatch.setattr(decode, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def timed(real):
        def step(self, *args, **kw):
            now[0] += 1.0 if kw.get("prefill") else 1e-3
            return real(self, *args, **kw)

        return step

    for name in ("trunk", "mtp", "greedy_round"):
        monkeypatch.setattr(TorchSteps, name, timed(getattr(TorchSteps, name)))
    backend = TorchBackend(reference, reference.spec)
    for k, prefill_calls in ((0, 1), (2, 2)):  # the trunk's pass, then (speculating) the MTP layer's
        _, st = generate(backend, PROMPTS[0], 12, draft_tokens=k)
        assert st.prefill_s == pytest.approx(prefill_calls)
        assert 0 < st.decode_s < 0.1  # only fixed-shape calls: drafts, rounds, plain steps


@pytest.mark.slow
def test_compiled_steps_give_the_eager_ids(reference):
    """torch.compile(fullgraph=True) of the decode, verify and MTP steps: the same greedy ids,
    batched and alone; the compile is reported apart and paid once per shape."""
    eager = TorchBackend(reference, reference.spec)
    compiled = TorchBackend(reference, reference.spec, compiled=True)
    prompts = PROMPTS[:2]
    for k in (0, 2):
        want, _ = generate_batch(eager, prompts, 12, draft_tokens=k)
        got, st = generate_batch(compiled, prompts, 12, draft_tokens=k)
        assert got == want and st.compile_s > 0
        again, st2 = generate_batch(compiled, prompts, 12, draft_tokens=k)
        assert again == want and st2.compile_s == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "aoti"])
def test_exported_graphs_decode_a_batch(built, reference, target):
    """ONNX Runtime and AOTInductor take the batch in one call per step: both give the torch
    model's greedy ids for every row, plain and speculative."""
    art = open_artifact(built / target)
    torch_backend = TorchBackend(reference, reference.spec)
    for k in (0, 2):
        want = _alone(torch_backend, PROMPTS, 10, k)
        got, stats = generate_batch(art.backend, PROMPTS, 10, draft_tokens=k)
        assert got == want, (target, k)
        assert stats.batch == 4


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "aoti"])
def test_exported_rounds_equal_the_torch_round(built, reference, verify_case, target):
    """Two greedy rounds of 2 drafts on the exported steps (verify graph, then the chained draft
    on the MTP graph) against the torch backend's one-graph round, from the same prefill: in
    the first, row 0 accepts both drafts and row 1 none (conftest's VerifyCase), so the chained
    drafts and the second round start at different positions per row."""
    exported = open_artifact(built / target).backend.steps(2, 64)
    eager = TorchBackend(reference, reference.spec).steps(2, 64)
    assert callable(getattr(exported, "greedy_round", None))
    ids, pos = verify_case.ids, verify_case.pos
    for steps in (exported, eager):
        verify_case.prefill(steps)
    for round_ in range(2):
        got, want = exported.greedy_round(ids, pos, 2), eager.greedy_round(ids, pos, 2)
        for g, w in zip(got, want, strict=True):  # best, accepted, drafts, trunk_ok, draft_ok
            assert torch.equal(g, w), round_
        best, accepted, drafts = want[:3]
        if round_ == 0:
            assert accepted.tolist() == [2, 0]
        # The next round: each row's last committed token (the trunk's pick after its accepted
        # drafts) at its position, then its drafts.
        last = pos[:, 0] + accepted + 1
        ids = torch.cat((best.gather(1, accepted[:, None]), drafts), 1)
        pos = last[:, None] + torch.arange(3)
    # The caches the rounds left (the trunk's and the MTP layer's): one more step of each reads
    # every slot up to the rows' next positions.
    h = torch.randn(2, 1, reference.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for got, want in zip(
        (*exported.trunk(ids[:, :1], pos[:, :1]), *exported.mtp(ids[:, 1:2], h, pos[:, :1])),
        (*eager.trunk(ids[:, :1], pos[:, :1]), *eager.mtp(ids[:, 1:2], h, pos[:, :1])),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prompt_file_gives_one_line_per_prompt(tmp_path, tiny_checkpoint, capsys):
    import glmc

    out = tmp_path / "b"
    glmc.build(tiny_checkpoint, out, weights=tiny_checkpoint, emit=["torch"], dtype="f32")
    texts = ["hello there", "a", "the quick brown fox"]
    (tmp_path / "p.txt").write_text("\n".join([texts[0], "", texts[1], texts[2]]) + "\n")
    code = main(["generate", str(out), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "6",
                 "--speculative", "mtp", "--draft-tokens", "2"])  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    art = open_artifact(out / "torch")
    from glmc.runtime import load_tokenizer

    tok = load_tokenizer([art.folder], art.spec.vocab_size)
    want = [tok.decode(generate(art.backend, tok.encode(t), 6)[0]) for t in texts]
    assert text.splitlines() == [w.replace("\\", "\\\\").replace("\n", "\\n") for w in want]
    assert "3 prompts" in err
    dtype = "bf16" if fast_bf16()[0] else "fp32"
    assert f"torch backend, {dtype} (" in err  # --dtype auto says what it chose and why


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no prompt in it"), ("\n  \n", "no prompt in it"), (b"\xff\xfe\x00", "cannot read it")],
)
def test_bad_prompt_file_exits_2(tmp_path, tiny_checkpoint, content, message, capsys):
    f = tmp_path / "p.txt"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    code = main(["generate", str(tiny_checkpoint), "--prompt-file", str(f)])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_prompt_file_exits_2(tmp_path, tiny_checkpoint, capsys):
    code = main(["generate", str(tiny_checkpoint), "--prompt-file", str(tmp_path / "none.txt")])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot read it" in err


def test_graph_artifacts_refuse_bf16_and_compile(tmp_path, capsys):
    """Only the torch backend changes dtype or compiles at run time: asking it of another
    artifact is refused, naming the option, before any graph is loaded."""
    import json

    from glmc import presets
    from glmc.export import RUNTIME_FILE

    onnx = tmp_path / "onnx"
    onnx.mkdir()
    manifest = {"target": "onnx", "files": {}, "spec": presets.get("glm-tiny").model_dump(mode="json")}
    (onnx / RUNTIME_FILE).write_text(json.dumps(manifest))
    for flag, message in (
        (["--dtype", "bf16"], "compiled for fp32"),
        (["--compile"], "applies to the torch"),
    ):
        code = main(["generate", str(onnx), "--prompt-ids", "1,2", *flag])
        _, err = capsys.readouterr()
        assert code == 2 and message in err, err
