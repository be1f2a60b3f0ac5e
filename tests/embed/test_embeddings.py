"""Sentence embeddings (aviary.embeddings, `aviary embed`): each method is what docs/embeddings.md says it is,
on tiny random models; a batch == one text at a time; a long text in chunks == one pass; normalisation,
truncation and base64; EmbeddingRWKV checkpoints == the rwkv-emb package on a random checkpoint in its layout."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aviary
from aviary.cli import main
from aviary.embeddings import (
    EOS,
    StateStats,
    embed,
    embed_methods,
    hidden_states,
    load_embedding_rwkv,
    to_base64,
    truncate,
)
from aviary.loading import model_from_state_dict
from aviary.testing import ByteTokenizer, random_config, random_state_dict

TOK = ByteTokenizer()
TEXTS = ["a", "hello world", "The quick brown fox jumps over the lazy dog. " * 3, "xy", "naïve café, 東京"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(version: int, vocab_size: int = 300, seed: int = 0, **sizes):
    config = random_config(version, n_layer=2, n_embd=64, head_size=32, vocab_size=vocab_size, **sizes)
    return model_from_state_dict(random_state_dict(config, seed=seed))


@pytest.fixture(scope="module", params=[4, 5, 6, 7])
def model(request):
    return tiny(request.param)


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([TOK.encode(text)])


# ---- the definitions ---------------------------------------------------------------------------------------


def test_hidden_states_are_what_the_head_reads(model):
    """`hidden_states` runs the blocks as RWKV.forward does: the head of its output == forward's logits, and the
    states agree (T = 1 too, which forward runs through the recurrent step)."""
    for text in ("a", "hello there, my friend"):
        tokens = ids_of(text)
        with torch.no_grad():
            h, state = hidden_states(model, tokens)
            logits, ref_state = model(tokens)
            torch.testing.assert_close(model.head(h), logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.wkv, ref_state.wkv, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.shift, ref_state.shift, atol=1e-5, rtol=1e-4)


def test_last_and_mean_are_the_final_hidden_states(model):
    text = "hello there, my friend"
    h, _ = hidden_states(model, ids_of(text))
    last = embed(model, TOK, text, method="last", normalize=False)
    mean = embed(model, TOK, text, method="mean", normalize=False)
    torch.testing.assert_close(last[0], h[0, -1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean[0], h[0].mean(0), atol=1e-6, rtol=1e-5)


def test_state_is_the_wkv_state_standardised_per_channel(model):
    text = "hello there, my friend"
    with torch.no_grad():
        _, state = model(ids_of(text))
    wkv = state.wkv.float()
    raw = (wkv[:, :, 0] / wkv[:, :, 1] if model.config.version == 4 else wkv).flatten(1)[0]
    stats = StateStats.collect(model, TOK, ["one text", "another text", "a third, longer text than the others"])
    got = embed(model, TOK, text, method="state", normalize=False, state_stats=stats)[0]
    torch.testing.assert_close(got, (raw - stats.mean) / stats.scale, atol=1e-4, rtol=1e-4)
    assert got.shape == raw.shape
    # the default statistics come from the fixed calibration set: independent of what is embedded
    a = embed(model, TOK, [text], method="state")
    b = embed(model, TOK, [text, "something else entirely"], method="state")[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["last", "mean", "state"])
def test_a_batch_equals_one_text_at_a_time(model, method):
    together = embed(model, TOK, TEXTS, method=method, batch_size=3)
    alone = torch.cat([embed(model, TOK, [t], method=method) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_several_methods_from_one_pass_equal_each_alone(model):
    together = embed_methods(model, TOK, TEXTS, ["last", "state", "mean"], batch_size=2)
    for method, vectors in together.items():
        torch.testing.assert_close(vectors, embed(model, TOK, TEXTS, method=method), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["last", "mean", "state"])
def test_a_long_text_in_chunks_equals_one_pass(method):
    model = tiny(7)
    text = "It was the best of times, it was the worst of times. " * 8  # 424 tokens
    chunked = embed(model, TOK, text, method=method, chunk_len=37)
    whole = embed(model, TOK, text, method=method, chunk_len=10_000)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_normalisation_truncation_and_base64():
    model = tiny(7)
    raw = embed(model, TOK, TEXTS, method="mean", normalize=False)
    unit = embed(model, TOK, TEXTS, method="mean")
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(unit, F.normalize(raw, dim=1))
    cut = truncate(unit, 10)
    assert cut.shape == (len(TEXTS), 10)
    torch.testing.assert_close(cut, F.normalize(unit[:, :10], dim=1))
    for bad in (0, 65):
        with pytest.raises(ValueError, match="dimensions"):
            truncate(unit, bad)
    back = np.frombuffer(base64.b64decode(to_base64(unit[1])), dtype="<f4")
    assert np.array_equal(back, unit[1].numpy())


def test_token_id_inputs_and_the_model_convenience():
    model = tiny(7)
    by_text = embed(model, TOK, TEXTS[:2])
    by_ids = embed(model, TOK, [TOK.encode(t) for t in TEXTS[:2]])
    torch.testing.assert_close(by_text, by_ids)
    torch.testing.assert_close(model.embed(TEXTS[:2], tokenizer=TOK), by_text)


def test_bad_inputs():
    model = tiny(7)
    with pytest.raises(ValueError, match="no texts"):
        embed(model, TOK, [])
    with pytest.raises(ValueError, match="text 1 is empty"):
        embed(model, TOK, ["a", ""])
    with pytest.raises(ValueError, match="unknown embedding method"):
        embed(model, TOK, "a", method="max")
    with pytest.raises(ValueError, match="outside"):
        embed(model, TOK, [[1, 299, 300]])
    with pytest.raises(ValueError, match="EmbeddingRWKV"):
        embed(model, TOK, "a", method="emb-rwkv")


# ---- EmbeddingRWKV (rwkv-emb) ----------------------------------------------------------------------------------


def emb_rwkv_checkpoint(path, seed: int = 3, lm_head: bool = False) -> dict:
    """A random checkpoint in rwkv-emb's layout: `rwkv.` + an RWKV-7 (head size 64, the package's only one; LoRA
    ranks its defaults for C = 128; layer 0 without the unused v0/v1/v2), `head.` + three task heads."""
    config = dataclasses.replace(random_config(7, n_layer=2, n_embd=128, vocab_size=65536),
                                 rank_w=32, rank_a=32, rank_v=32, rank_g=32)
    trunk = random_state_dict(config, seed=seed)
    for k in ("v0", "v1", "v2"):
        del trunk[f"blocks.0.att.{k}"]
    if not lm_head:
        del trunk["head.weight"]
    g = torch.Generator().manual_seed(seed)
    heads = {}
    for task in ("cls_head", "sts_head", "retr_head"):
        heads[f"{task}.fc1.weight"] = torch.randn(128, 128, generator=g) / 128**0.5
        heads[f"{task}.fc2.weight"] = torch.randn(128, 128, generator=g) / 128**0.5
        heads[f"{task}.norm.weight"] = 1 + 0.1 * torch.randn(128, generator=g)
        heads[f"{task}.norm.bias"] = 0.1 * torch.randn(128, generator=g)
    sd = {**{f"rwkv.{k}": v for k, v in trunk.items()}, **{f"head.{k}": v for k, v in heads.items()}}
    torch.save(sd, path)
    return sd


def test_emb_rwkv_definition(tmp_path):
    """EOS appended, the mean of h over EOS positions, then the task head: LayerNorm(x + fc2(relu(fc1 x)))."""
    sd = emb_rwkv_checkpoint(tmp_path / "emb.pth")
    model = load_embedding_rwkv(tmp_path / "emb.pth")
    ids = [5, 17, 300, 4000]
    h, _ = hidden_states(model, torch.tensor([ids + [EOS]]))
    x = h[0, -1]
    for task, name in (("[RETR]", "retr_head"), ("[STS]", "sts_head")):
        w = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"head.{name}.")}
        want = F.layer_norm(x + F.relu(x @ w["fc1.weight"].T) @ w["fc2.weight"].T, (128,), w["norm.weight"],
                            w["norm.bias"])
        got = embed(model, None, [ids], method="emb-rwkv", normalize=False, task=task)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # several EOS tokens in the input: the mean over all of them (rwkv-emb's MultiEOSPooling)
    h, _ = hidden_states(model, torch.tensor([[5, EOS, 17, EOS]]))
    pooled = embed(model, None, [[5, EOS, 17]], method="emb-rwkv", normalize=False)
    model.embedding_heads = None
    with pytest.raises(ValueError):
        embed(model, None, [[1]], method="emb-rwkv")
    heads_only = load_embedding_rwkv(tmp_path / "emb.pth").embedding_heads
    with torch.no_grad():
        torch.testing.assert_close(pooled[0], heads_only((h[0, 1] + h[0, 3]) / 2), atol=1e-5, rtol=1e-5)
    batch = embed(load_embedding_rwkv(tmp_path / "emb.pth"), None, [ids, [9], ids[:2]], method="emb-rwkv")
    alone = torch.cat([embed(load_embedding_rwkv(tmp_path / "emb.pth"), None, [s], method="emb-rwkv")
                       for s in (ids, [9], ids[:2])])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


def test_emb_rwkv_loader_refuses_other_checkpoints(tmp_path):
    from aviary.io import CheckpointError

    torch.save(random_state_dict(random_config(7, n_layer=1, n_embd=64, head_size=32, vocab_size=300)),
               tmp_path / "lm.pth")
    with pytest.raises(CheckpointError, match="EmbeddingRWKV"):
        load_embedding_rwkv(tmp_path / "lm.pth")


def rwkv_emb_on_cpu(monkeypatch):
    """`rwkv_emb.model` (the PyPI package) with its RWKV-7 trunk swapped for a CPU one. Its own trunk
    (reference/rwkv7.py) compiles a CUDA kernel when imported and runs in fp16 on a GPU; the stand-in is built
    from the package's other, pure-torch RWKV-7 (`rwkv_emb.model.Block`, which its reranker uses), in float32.
    Everything else (loading the `rwkv.`/`head.` layout, EOS pooling, the task heads) is the package's code."""
    if importlib.util.find_spec("rwkv_emb") is None:
        pytest.skip("rwkv-emb is not installed (pip install rwkv-emb)")
    pytest.importorskip("transformers")  # rwkv_emb.model imports its vision tower from transformers

    class CpuTrunk:
        def __init__(self, args, z):
            from rwkv_emb.model import Block  # the package's module, loaded by the time a model is built

            self.z = z
            H, N = z["blocks.0.att.r_k"].shape
            L = 1 + max(int(k.split(".")[1]) for k in z if k.startswith("blocks."))
            cfg = types.SimpleNamespace(n_embd=H * N, n_layer=L, head_size_a=N, dim_att=H * N, head_size_divisor=8)
            self.blocks = torch.nn.ModuleList(Block(cfg, i) for i in range(L))
            unused = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # absent or ignored in layer 0
            self.blocks.load_state_dict({k.removeprefix("blocks."): v for k, v in z.items()
                                         if k.startswith("blocks.") and k not in unused})
            self.shape = (1, H, N, N)

        def generate_zero_state(self, bsz):
            return None

        def forward(self, idx, state, full_output=False):
            z = self.z
            x, v_first = z["emb.weight"][idx][None], None  # [1, T, C]
            for block in self.blocks:
                x, v_first = block(x, v_first, torch.zeros(self.shape))
            x = F.layer_norm(x, x.shape[-1:], z["ln_out.weight"], z["ln_out.bias"])
            return x[0] if full_output else x[0, -1]

    stub = types.ModuleType("rwkv_emb.reference.rwkv7")
    stub.RWKV_x070, stub.DTYPE = CpuTrunk, torch.float32
    monkeypatch.setitem(sys.modules, "rwkv_emb.reference.rwkv7", stub)
    monkeypatch.delitem(sys.modules, "rwkv_emb.model", raising=False)
    import rwkv_emb.model

    return rwkv_emb.model


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, inside the package
def test_emb_rwkv_parity_with_the_rwkv_emb_package(tmp_path, monkeypatch):
    package = rwkv_emb_on_cpu(monkeypatch)
    path = tmp_path / "emb.pth"
    emb_rwkv_checkpoint(path)
    theirs_model = package.EmbeddingRWKV(str(path))
    ours_model = load_embedding_rwkv(path)
    from rwkv_emb.tokenizer import RWKVTokenizer

    theirs_tokenizer = RWKVTokenizer()  # the World vocabulary; encode() appends EOS 65535 (add_eos=True)
    ours_tokenizer = aviary.load_tokenizer(version=7)  # no EOS: embed(method="emb-rwkv") appends it
    for text, task in (("The cat sat on the mat.", "[RETR]"), ("query: what is RWKV?", "[STS]"), ("x", "[CLS]")):
        assert theirs_tokenizer.encode(text) == ours_tokenizer.encode(text) + [EOS]
        theirs, _ = theirs_model.forward(theirs_tokenizer.encode(text), None, task_type=task)
        ours = embed(ours_model, ours_tokenizer, [text], method="emb-rwkv", task=task, normalize=False)
        theirs = theirs.float()
        assert F.cosine_similarity(ours, theirs).item() > 0.99999
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ---- aviary embed ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_checkpoint(tmp_path_factory):
    from aviary.testing import save_random_checkpoint

    path = tmp_path_factory.mktemp("embed") / "tiny.pth"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=65536), seed=2)
    return path


def test_cli_outputs(world_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    texts = ["The cat sat on the mat.", "Un chat était assis sur le tapis.", "def f(x): return x"]
    (tmp_path / "in.txt").write_text("\n".join(texts[:2]) + "\n\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    model = aviary.load(world_checkpoint)
    want = embed(model, aviary.load_tokenizer(version=7), texts, method="last")

    assert main(["embed", str(world_checkpoint), *texts, "--method", "last"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["text"] for r in rows] == texts
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in rows]), want)

    assert main(["embed", str(world_checkpoint), "--file", str(tmp_path / "in.txt"), "--method", "last",
                 "-o", str(tmp_path / "out.npy")]) == 0
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), want[:2])

    assert main(["embed", str(world_checkpoint), "--file", str(tmp_path / "in.jsonl"), "--field", "body",
                 "--method", "last", "-o", str(tmp_path / "out.safetensors"), "--dimensions", "8"]) == 0
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["embeddings"], truncate(want, 8))

    assert main(["embed", str(world_checkpoint), texts[0], "-o", str(tmp_path / "out.jsonl")]) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    torch.testing.assert_close(torch.tensor([row["embedding"]]),
                               embed(model, aviary.load_tokenizer(version=7), texts[:1], method="mean"))


def test_cli_emb_rwkv(tmp_path, capsys):
    emb_rwkv_checkpoint(tmp_path / "emb.pth")
    assert main(["embed", str(tmp_path / "emb.pth"), "hello", "--method", "emb-rwkv", "--task", "[STS]"]) == 0
    got = torch.tensor(json.loads(capsys.readouterr().out)["embedding"])
    want = embed(load_embedding_rwkv(tmp_path / "emb.pth"), aviary.load_tokenizer(version=7), "hello",
                 method="emb-rwkv", task="[STS]")[0]
    torch.testing.assert_close(got, want)
