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
    assert s0.mean_acceptance_length == 1.0 and 1.0 <= s1.mean_acceptance_length <= k + 1
    assert s1.rounds <= s0.rounds


def test_speculation_accepts_drafts_when_mtp_agrees(make_tiny):
    """An MTP layer that copies the trunk's next-token choice makes drafts acceptable: with a
    model whose next token is a fixed function of the current one (zero attention/MLP, the
    head reading the embedding), both agree and every draft is accepted."""
    m = make_tiny()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                continue
            if n in ("model.embed_tokens.weight", "lm_head.weight", "model.mtp.0.eh_proj.weight"):
                continue
            p.zero_()
        h = m.model.embed_tokens.weight.shape[1]
        # eh_proj passes the embedding half through: MTP(h_t, x_{t+1}) ~ trunk(x_{t+1}).
        m.model.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(h), torch.zeros(h, h)], 1))
    backend = TorchBackend(m, m.spec)
    plain, _ = generate(backend, PROMPT, 24)
    spec, stats = generate(backend, PROMPT, 24, draft_tokens=3)
    assert spec == plain
    assert stats.mean_acceptance_length > 3.0  # 4 tokens per trunk forward (the last round is shorter)


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
