"""`glmc generate`: KV-cache decoding, greedy and sampled, MTP speculation lossless on every
artifact type, output format, and bad input (exit 2 with one message)."""

import json
import shutil

import pytest
import torch

import glmc
from glmc.cli import main
from glmc.runtime import Sampling, generate, open_artifact
from glmc.runtime.backend import TorchBackend
from glmc.runtime.decode import _accept

PROMPT = [5, 17, 42, 7, 300, 12, 99]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _plain_greedy(model, prompt, n):
    """Reference: full forward over the whole sequence each step (no cache, no speculation)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_torch_speculative_greedy_equals_plain_greedy(reference, k):
    backend = TorchBackend(reference, reference.spec)
    want = _plain_greedy(reference, PROMPT, 20)
    plain, s0 = generate(backend, PROMPT, 20)
    spec, s1 = generate(backend, PROMPT, 20, draft_tokens=k)
    assert plain == want and spec == want
    # prefill commits the first token, every decode round at least one
    assert s0.accepted_per_round == [1] * 19 and s0.rounds == 19
    assert sum(s1.accepted_per_round) == 19 and s1.rounds == len(s1.accepted_per_round)
    assert all(1 <= a <= k + 1 for a in s1.accepted_per_round)


def _markov_model(make_tiny, mtp_noise: float):
    """A model whose next token is a fixed function f of the current one (attention and MLPs
    zeroed, the head reading the embedding), and whose MTP layer drafts g(x) from the token
    alone (eh_proj passes the embedding half through, plus noise: g = f where the noise is
    small). Returns the model, f and g as lookup tables over the vocabulary."""
    m = make_tiny()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                continue
            if n in ("model.embed_tokens.weight", "lm_head.weight", "model.mtp.0.eh_proj.weight"):
                continue
            p.zero_()
        h = m.model.embed_tokens.weight.shape[1]
        noise = mtp_noise * torch.randn(h, h, generator=g)
        m.model.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(h) + noise, torch.zeros(h, h)], 1))
        vocab = m.spec.vocab_size
        # Row x = [0, x]: the trunk's logits at position 1 give f(x), the MTP's at position 0 g(x).
        ids = torch.stack([torch.zeros(vocab, dtype=torch.int64), torch.arange(vocab)], 1)
        logits, (mtp,) = m.forward_with_mtp(ids)
    return m, logits[:, 1].argmax(-1).tolist(), mtp[:, 0].argmax(-1).tolist()


def _expected_rounds(f: list[int], g: list[int], first: int, n_new: int, k: int) -> list[int]:
    """Tokens committed per round by greedy speculation with k chained drafts, from the lookup
    tables alone: drafts d1 = g(last), d(j+1) = g(dj), accepted while each equals the trunk's
    choice f(previous); then the trunk's own next token. Rounds never overshoot n_new."""
    rounds, last, done = [], first, 1  # prefill committed the first new token
    while done < n_new:
        kk = min(k, n_new - done - 1)
        accepted, prev, d = 0, last, g[last]
        while accepted < kk and d == f[prev]:
            accepted, prev, d = accepted + 1, d, g[d]
        rounds.append(accepted + 1)
        for _ in range(accepted + 1):
            last = f[last]
        done += accepted + 1
    return rounds


@pytest.mark.parametrize("k", [1, 2, 4])
def test_speculation_commits_exactly_the_drafts_the_trunk_agrees_with(make_tiny, k):
    """Per-round acceptance equals what the lookup tables predict (an independent simulation of
    the speculation rule), on a model whose MTP agrees with the trunk for part of the vocabulary
    only, so rounds both accept and reject."""
    m, f, g = _markov_model(make_tiny, mtp_noise=0.02)  # g = f on 76% of the vocabulary
    agree = sum(a == b for a, b in zip(f, g, strict=True)) / len(f)
    assert 0.2 < agree < 0.9, agree  # both outcomes occur
    backend = TorchBackend(m, m.spec)
    plain, _ = generate(backend, PROMPT, 40)
    spec, stats = generate(backend, PROMPT, 40, draft_tokens=k)
    assert spec == plain
    assert stats.accepted_per_round == _expected_rounds(f, g, plain[0], 40, k)
    assert 1 in stats.accepted_per_round and max(stats.accepted_per_round) > 1


def test_speculation_accepts_every_draft_when_mtp_agrees(make_tiny):
    """With g = f every draft is accepted: k + 1 tokens per round until the budget's end."""
    m, f, g = _markov_model(make_tiny, mtp_noise=0.0)
    assert f == g
    backend = TorchBackend(m, m.spec)
    plain, _ = generate(backend, PROMPT, 24)
    spec, stats = generate(backend, PROMPT, 24, draft_tokens=3)
    assert spec == plain
    assert stats.accepted_per_round == [4] * 5 + [3]  # 1 (prefill) + 5 x 4 + 3 = 24


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torch", "hf", "trtllm", "aoti", "onnx"])
def test_every_artifact_generates_the_same_greedy_tokens_with_and_without_mtp(
    built, reference, target, capsys
):
    want = _plain_greedy(reference, PROMPT, 16)
    ids = ",".join(map(str, PROMPT))
    for extra in (
        [],
        ["--speculative", "mtp", "--draft-tokens", "3"],
        ["--speculative", "mtp", "--draft-tokens", "1"],
    ):
        code, out, err = run(
            ["generate", built, "--target", target, "--prompt-ids", ids, "--max-new-tokens", 16, *extra],
            capsys,
        )
        assert code == 0, err
        assert [int(t) for t in out.splitlines()[0].split(",")] == want, (target, extra)
        assert "tokens/s" in err and "mean acceptance length" in err and f"{target} backend" in err


def test_sampling_is_seeded_and_speculative_sampling_stays_in_vocab(reference):
    backend = TorchBackend(reference, reference.spec)
    s = Sampling(greedy=False, temperature=0.8, top_p=0.9, seed=3)
    a, _ = generate(backend, PROMPT, 12, s)
    b, _ = generate(backend, PROMPT, 12, s)
    c, _ = generate(backend, PROMPT, 12, s, draft_tokens=2)
    assert a == b and len(c) == 12 and all(0 <= t < 512 for t in c)


def test_speculative_sampling_accepts_all_when_draft_equals_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50)
    s = Sampling(greedy=False, temperature=1.0, seed=0)
    from glmc.runtime.sampling import distribution

    q = [distribution(logits[i], s) for i in range(2)]
    drafts = [int(torch.multinomial(qi, 1, generator=g)) for qi in q]
    out = _accept(logits, drafts, q, s, g)
    assert out[:2] == drafts and len(out) == 3  # p == q: always accepted, plus the bonus token


def test_text_prompt_with_byte_fallback_and_tokenizer_json(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "b"
    glmc.build(tiny_checkpoint, out, weights=tiny_checkpoint, emit=["torch"], dtype="f32")
    code, text, err = run(["generate", out, "--prompt", "hello", "--max-new-tokens", 5], capsys)
    assert code == 0, err
    assert len(text.splitlines()) == 1
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 5, "world": 17, "[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "torch" / "tokenizer.json"))
    code, text, err = run(
        ["generate", out / "torch", "--prompt", "hello world", "--max-new-tokens", 4], capsys
    )
    assert code == 0, err
    art = open_artifact(out / "torch")
    want, _ = generate(art.backend, [5, 17], 4)
    assert text.splitlines()[0] == tok.decode(want, skip_special_tokens=False)


# ---- bad input: exit 2, one message, no traceback --------------------------------------------


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """A torch-only build with a 16-token context and no MTP layer (cheap to make)."""
    spec = glmc.presets.get("glm-tiny").model_dump(mode="json")
    spec.update(max_position_embeddings=16, num_mtp_layers=0, name="ctx16")
    path = tmp_path_factory.mktemp("s") / "spec.json"
    path.write_text(json.dumps(spec))
    out = path.parent / "out"
    glmc.build(path, out, emit=["torch", "hf"], dtype="f32")
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-ids", ",".join(["1"] * 16)], "context is 16"),
        (["--prompt-ids", "1,2", "--speculative", "mtp"], "needs MTP weights"),
        (["--prompt-ids", "1,2", "--draft-tokens", "2"], "needs --speculative"),
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", "1,999"], "outside the vocabulary"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "at least 1"),
        (["--prompt-ids", "1,2", "--temperature", "0"], "temperature must be > 0"),
        (["--prompt-ids", "1,2", "--target", "onnx"], "has no onnx/ folder"),
    ],
)
def test_bad_input_exits_2(small_build, argv, message, capsys):
    code, out, err = run(["generate", small_build, *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


@pytest.mark.parametrize("k", ["0", "9", "-1"])
def test_draft_tokens_out_of_range(small_build, k, capsys):
    code, _, err = run(
        ["generate", small_build, "--prompt-ids", "1,2", "--speculative", "mtp", "--draft-tokens", k], capsys
    )
    assert code == 2 and "--draft-tokens must be in 1..8" in err


def test_missing_or_broken_artifact_folders(small_build, tmp_path, capsys):
    code, _, err = run(["generate", tmp_path / "nope", "--prompt-ids", "1"], capsys)
    assert code == 2 and "not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["generate", tmp_path / "empty", "--prompt-ids", "1"], capsys)
    assert code == 2 and "not a glmc artifact" in err
    broken = tmp_path / "broken"
    shutil.copytree(small_build / "torch", broken)
    (broken / "model.safetensors").unlink()
    code, _, err = run(["generate", broken, "--prompt-ids", "1"], capsys)
    assert code == 2 and "model.safetensors" in err


@pytest.mark.slow
def test_onnx_folder_missing_a_graph(built, tmp_path, capsys):
    broken = tmp_path / "onnx"
    shutil.copytree(built / "onnx", broken)
    (broken / "mtp.onnx").unlink()
    code, _, err = run(["generate", broken, "--prompt-ids", "1,2"], capsys)
    assert code == 2 and "missing mtp.onnx" in err


def test_no_mtp_checkpoint_from_transformers_refuses_speculation(make_tiny, tmp_path, capsys):
    """A checkpoint saved by transformers has no MTP tensors: generate says so."""
    m = make_tiny()
    glmc.save_pretrained(m, tmp_path / "ck")
    for f in (tmp_path / "ck").glob("*.safetensors"):
        from safetensors.torch import load_file, save_file

        state = {k: v for k, v in load_file(str(f)).items() if not k.startswith("model.layers.3.")}
        save_file(state, str(f), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="no model.layers.3"):
        code, _, err = run(
            ["generate", tmp_path / "ck", "--prompt-ids", "1,2", "--speculative", "mtp"], capsys
        )
    assert code == 2 and "needs MTP weights" in err
