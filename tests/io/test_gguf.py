"""GGUF files for llama.cpp (`aviary.io.gguf`, `aviary convert model.pth model.gguf`): read back with the gguf package
they hold the metadata, vocabulary, names, shapes, types and values that llama.cpp's converter writes; llama.cpp
(llama-cpp-python, where installed) gives Aviary's logits and tokens; what llama.cpp cannot run is refused.

Also a script, for the parity numbers in docs/checkpoints.md (random weights, last-token logits):

    python tests/io/test_gguf.py --layers 12 --width 768 --tokens 128
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aviary
from aviary.cli import main
from aviary.io import read_state_dict
from aviary.io.gguf import CHAT_TEMPLATE, GGUFError, tensor_type, write_gguf
from aviary.loading import check_state_dict
from aviary.testing import random_config, random_state_dict, save_random_checkpoint
from aviary.tokenizer.world import WORLD_VOCAB, load_vocab

gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
QTYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
# RWKV-6 with 7 blocks, so that f16's rescale (every 6 blocks) divides block 6; two heads each. RWKV-7's are of 64:
# llama.cpp's CPU WKV-7 kernel is wrong for 32 (test_warns_of_a_head_size_llama_cpp_gets_wrong)
SIZES = {6: dict(n_layer=7, n_embd=64, head_size=32), 7: dict(n_layer=2, n_embd=128, head_size=64)}
# llama.cpp's logits against Aviary fp32's, last token of 40, on these models (logit std about 1); measured for
# RWKV-6 / RWKV-7: f32 8.8e-6 / 1.9e-6, f16 1.2e-2 / 3.9e-3, q8_0 0.31 / 0.19 (most of it the rounding of the
# weights themselves, which random models amplify). f16 and q8_0 also round activations, differently by CPU.
LLAMA_TOL = {"f32": 1e-4, "f16": 5e-2, "q8_0": 0.8}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{version: path} of small random RWKV-6 / RWKV-7 checkpoints with the World vocabulary's 65536 rows."""
    d = tmp_path_factory.mktemp("gguf")
    paths = {}
    for version, sizes in SIZES.items():
        paths[version] = d / f"rwkv{version}.pth"
        save_random_checkpoint(paths[version], random_config(version, vocab_size=65536, **sizes), seed=version)
    return paths


@pytest.fixture(scope="module")
def converted(checkpoints):
    """(version, outtype) -> path of the GGUF file, converted once, on first use."""
    cache = {}

    def get(version, outtype):
        if (version, outtype) not in cache:
            src = checkpoints[version]
            path = src.with_name(f"{src.stem}-{outtype}.gguf")
            write_gguf(read_state_dict(src)[0], path, outtype, name=src.stem)
            cache[version, outtype] = path
        return cache[version, outtype]

    return get


@pytest.fixture(scope="module")
def reader(converted):
    """(version, outtype) -> gguf.GGUFReader of that file (parsing the 65536 tokens takes a few seconds)."""
    cache = {}

    def get(version, outtype):
        if (version, outtype) not in cache:
            cache[version, outtype] = gguf.GGUFReader(converted(version, outtype))
        return cache[version, outtype]

    return get


# ---- what llama.cpp's converter writes (convert_hf_to_gguf.py: Rwkv6Model, Rwkv7Model), written out again --------

def expected_tensors(sd: dict, version: int, n_layer: int, rescale_every: int = 0) -> dict[str, torch.Tensor]:
    e = {"token_embd.weight": sd["emb.weight"], "output.weight": sd["head.weight"]}
    for part, key in (("token_embd_norm", "blocks.0.ln0"), ("output_norm", "ln_out")):
        e |= {f"{part}.weight": sd[f"{key}.weight"], f"{part}.bias": sd[f"{key}.bias"]}
    for i in range(n_layer):
        def att(name, i=i):
            return sd[f"blocks.{i}.att.{name}"]

        def ffn(name, i=i):
            return sd[f"blocks.{i}.ffn.{name}"]

        scale = 2 ** (i // rescale_every) if rescale_every else 1
        b = {"attn_norm.weight": sd[f"blocks.{i}.ln1.weight"], "attn_norm.bias": sd[f"blocks.{i}.ln1.bias"],
             "attn_norm_2.weight": sd[f"blocks.{i}.ln2.weight"], "attn_norm_2.bias": sd[f"blocks.{i}.ln2.bias"],
             "time_mix_receptance.weight": att("receptance.weight"), "time_mix_key.weight": att("key.weight"),
             "time_mix_value.weight": att("value.weight"), "time_mix_output.weight": att("output.weight") / scale,
             "time_mix_ln.weight": att("ln_x.weight"), "time_mix_ln.bias": att("ln_x.bias"),
             "channel_mix_key.weight": ffn("key.weight"), "channel_mix_value.weight": ffn("value.weight") / scale}
        if version == 6:
            b |= {"time_mix_lerp_x.weight": att("time_maa_x").flatten(),
                  "time_mix_lerp_fused.weight": torch.stack([att(f"time_maa_{c}") for c in "wkvrg"]),  # [5, 1, 1, C]
                  "time_mix_w1.weight": att("time_maa_w1").T, "time_mix_w2.weight": att("time_maa_w2").transpose(1, 2),
                  "time_mix_decay.weight": att("time_decay").flatten(),
                  "time_mix_decay_w1.weight": att("time_decay_w1").T,
                  "time_mix_decay_w2.weight": att("time_decay_w2").T,
                  "time_mix_first.weight": att("time_faaaa"), "time_mix_gate.weight": att("gate.weight"),
                  "channel_mix_lerp_k.weight": ffn("time_maa_k").flatten(),
                  "channel_mix_lerp_r.weight": ffn("time_maa_r").flatten(),
                  "channel_mix_receptance.weight": ffn("receptance.weight")}
        else:
            for x in "wav":
                src = "a" if (x, i) == ("v", 0) else x  # block 0 has no value residual: llama.cpp wants a0-a2 there
                b |= {f"time_mix_{x}0.weight": att(f"{src}0").flatten(), f"time_mix_{x}1.weight": att(f"{src}1").T,
                      f"time_mix_{x}2.weight": att(f"{src}2").T}
            b |= {"time_mix_g1.weight": att("g1").T, "time_mix_g2.weight": att("g2").T,
                  "time_mix_k_k.weight": att("k_k").flatten(), "time_mix_k_a.weight": att("k_a").flatten(),
                  "time_mix_r_k.weight": att("r_k").flatten(),
                  "time_mix_lerp_fused.weight": torch.stack([att(f"x_{c}") for c in "rwkvag"]),  # [6, 1, 1, C]
                  "channel_mix_lerp_k.weight": ffn("x_k").flatten()}
        e |= {f"blk.{i}.{k}": v for k, v in b.items()}
    return e


KEEP_F32 = ("time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1", "time_mix_decay_w2",
            "time_mix_lerp_fused")


def expected_type(name: str, t: torch.Tensor, outtype: str):
    if t.dim() == 1 or not name.endswith(".weight") or name.split(".")[-2] in KEEP_F32:
        return Q.F32
    return QTYPES[outtype]


def field(r, key):
    return r.fields[key].contents()


def unescape(text: str) -> bytes:
    """llama.cpp's reading of an RWKV token (llama_unescape_rwkv_token): \\t \\n \\r, \\xNN, \\<char> -> char."""
    out, i = bytearray(), 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]
            if nxt == "x":
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += {"t": b"\t", "n": b"\n", "r": b"\r"}.get(nxt, nxt.encode())
            i += 2
            continue
        out += c.encode()
        i += 1
    return bytes(out)


# ---- the file, read back -----------------------------------------------------------------------------------------

# f16 on RWKV-6 (with the rescale) and q8_0 on RWKV-7: between them every rule of names, shapes and types, and each
# read costs seconds (the 65536 tokens). All six pairs run under llama.cpp below.
@pytest.mark.parametrize("version,outtype", [(6, "f16"), (7, "q8_0")])
def test_file_holds_what_llama_cpp_reads(checkpoints, reader, version, outtype):
    r = reader(version, outtype)
    sd = read_state_dict(checkpoints[version])[0]
    config = check_state_dict(sd)
    arch = f"rwkv{version}"
    assert field(r, "general.architecture") == arch
    assert field(r, "general.name") == f"rwkv{version}"
    assert field(r, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert field(r, f"{arch}.block_count") == config.n_layer
    assert field(r, f"{arch}.embedding_length") == config.n_embd
    assert field(r, f"{arch}.feed_forward_length") == config.dim_ffn
    assert field(r, f"{arch}.wkv.head_size") == config.head_size
    assert field(r, f"{arch}.context_length") == 1 << 20
    assert field(r, f"{arch}.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(r, f"{arch}.attention.head_count") == 0
    rescale = 0
    if version == 6:
        rescale = field(r, "rwkv6.rescale_every_n_layers")
        assert rescale == (6 if outtype == "f16" else 0)
        assert field(r, "rwkv6.time_mix_extra_dim") == config.rank_mix
        assert field(r, "rwkv6.time_decay_extra_dim") == config.rank_decay
    else:
        assert [field(r, f"rwkv7.attention.{k}_lora_rank") for k in ("decay", "iclr", "value_residual_mix", "gate")] \
            == [config.rank_w, config.rank_a, config.rank_v, config.rank_g]

    want = expected_tensors(sd, version, config.n_layer, rescale)
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)
    kinds = gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, arch.upper())]
    known = {gguf.TENSOR_NAMES[k].format(bid=i) for k in kinds for i in range(config.n_layer)}
    assert {name.rsplit(".", 1)[0] for name in got} <= known  # names the gguf package knows for the architecture
    for name, w in want.items():
        t = got[name]
        assert t.tensor_type == expected_type(name, w, outtype), name
        assert tuple(int(n) for n in reversed(t.shape)) == tuple(w.shape), name  # GGUF lists dims innermost first
        value = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        if t.tensor_type == Q.F32:
            assert torch.equal(value, w.float()), name
        elif t.tensor_type == Q.F16:
            assert torch.equal(value, w.half().float()), name
        else:  # q8_0: blocks of 32 along rows, scale amax / 127 kept in f16
            blocks, err = w.reshape(-1, 32), (value - w).reshape(-1, 32).abs()
            step = blocks.abs().amax(1, keepdim=True) / 127
            bound = (0.5 + 127 * 2**-11) * step + 1e-7  # half a step, and 127 times the scale's f16 rounding
            assert (err <= bound).all(), name


def test_vocabulary_is_the_world_vocabulary_as_llama_cpp_reads_it(reader):
    r = reader(7, "q8_0")
    assert field(r, "tokenizer.ggml.model") == "rwkv"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    vocab = load_vocab(WORLD_VOCAB)
    assert len(tokens) == len(types) == 65536
    assert tokens[0] == "<s>" and types[0] == gguf.TokenType.CONTROL
    assert [unescape(t) for t in tokens[1:len(vocab)]] == vocab[1:]
    assert set(types[1:len(vocab)]) == {gguf.TokenType.NORMAL}
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 65536)]
    assert set(types[len(vocab):]) == {gguf.TokenType.UNUSED}
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (0, 0)
    assert vocab[field(r, "tokenizer.ggml.eot_token_id")] == b"\n\n"
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_chat_template_renders_the_world_chat_format():
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi\n\nthere "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text == "System: Be brief.\n\nUser: hi\nthere\n\nAssistant: Hello.\n\nUser: Why?\n\nAssistant:"


def test_q8_0_falls_back_to_f16_for_rows_it_cannot_block():
    assert tensor_type("TIME_MIX_KEY", "blk.0.time_mix_key.weight", (64, 48), "q8_0") == Q.F16
    assert tensor_type("TIME_MIX_KEY", "blk.0.time_mix_key.weight", (64, 64), "q8_0") == Q.Q8_0


# ---- what llama.cpp cannot run ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    ("v4", "RWKV-6 and RWKV-7 only"), ("v5", "RWKV-6 and RWKV-7 only"),
    ("time_state", "time_state"), ("small vocab", "World vocabulary"),
])
def test_refuses_what_llama_cpp_cannot_run(tmp_path, case, message):
    version = {"v4": 4, "v5": 5}.get(case, 7)
    config = random_config(version, n_layer=1, n_embd=64, vocab_size=300 if case == "small vocab" else 65536)
    sd = random_state_dict(config, time_state=case == "time_state")
    out = tmp_path / "x.gguf"
    with pytest.raises(GGUFError, match=message):
        write_gguf(sd, out)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_warns_of_a_head_size_llama_cpp_gets_wrong(tmp_path):
    sd = random_state_dict(random_config(7, n_layer=1, n_embd=64, head_size=32, vocab_size=65536))
    with pytest.warns(UserWarning, match="head size 32"):
        write_gguf(sd, tmp_path / "x.gguf", "f32")


def test_missing_gguf_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, checkpoints, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    assert main(["convert", str(checkpoints[7]), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'aviary[gguf]'" in err
    assert list(tmp_path.iterdir()) == []


# ---- the command -----------------------------------------------------------------------------------------------

def test_convert_command(tmp_path, checkpoints, capsys):
    out = tmp_path / "model.gguf"
    assert main(["convert", str(checkpoints[7]), str(out), "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "RWKV-7, 62 tensors (36 f32, 26 q8_0): official -> gguf q8_0" in printed
    assert out.read_bytes()[:4] == b"GGUF" and list(tmp_path.iterdir()) == [out]

    assert main(["convert", str(checkpoints[7]), str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    for argv, why in ((["--dtype", "float16"], "--outtype"), (["--layout", "official"], "--outtype")):
        assert main(["convert", str(checkpoints[7]), str(out), "--force", *argv]) == 2
        assert why in capsys.readouterr().err
    assert main(["convert", str(checkpoints[7]), str(tmp_path / "x.pth"), "--outtype", "f16"]) == 2
    assert "--outtype is for a .gguf DST" in capsys.readouterr().err
    assert main(["convert", str(checkpoints[7]), str(tmp_path / "nodir" / "x.gguf")]) == 2
    assert "nodir" in capsys.readouterr().err


def test_convert_outtype_choices_are_the_gguf_types():
    from aviary.commands import convert
    from aviary.io.gguf import OUTTYPES

    assert convert.GGUF_TYPES == OUTTYPES


# ---- llama.cpp -------------------------------------------------------------------------------------------------

def llama_cpp_logits(path: Path, tokens: list[int], threads: int = 2) -> torch.Tensor:
    """llama.cpp's logits after `tokens` [V] (llama-cpp-python, its logs off)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(tokens)), n_batch=64, n_ubatch=64,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.eval(tokens)
        ptr = ctypes.cast(llama_cpp.llama_get_logits_ith(llm.ctx, -1), ctypes.POINTER(ctypes.c_float))
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())
    finally:
        llm.close()


def aviary_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return aviary.load(path)(torch.tensor([tokens]), last_only=True)[0][0, -1]


def test_llama_cpp_gives_aviary_logits(checkpoints, converted):
    pytest.importorskip("llama_cpp")
    tokens = torch.randint(1, 65530, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    for version in (6, 7):
        ref = aviary_logits(checkpoints[version], tokens)
        for outtype, tol in LLAMA_TOL.items():
            diff = (llama_cpp_logits(converted(version, outtype), tokens) - ref).abs().max().item()
            assert diff <= tol, f"RWKV-{version} {outtype}: llama.cpp's logits differ from Aviary's by {diff:.2e}"


def test_llama_cpp_tokenizes_like_aviary(converted):
    llama_cpp = pytest.importorskip("llama_cpp")
    from aviary.tokenizer import load_tokenizer

    llm = llama_cpp.Llama(model_path=str(converted(7, "q8_0")), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    texts = ["Hello, 世界 👋\n\nUser: it's a \"test\" \\ \t\r\x00 done", "\\x41 \\n back\\slash'\"", "日本語。\n\n\n"]
    tok = load_tokenizer(version=7)
    try:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
            assert llm.detokenize(tok.encode(text)) == text.encode()
    finally:
        llm.close()


def llama_cpp_converter_tree() -> Path | None:
    """llama.cpp's own converter, where benchmarks/llamacpp_peer.py has already fetched it (never fetched here)."""
    path = Path(__file__).parents[2] / "benchmarks" / "llamacpp_peer.py"
    spec = importlib.util.spec_from_file_location("llamacpp_peer", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    try:
        return peer._tree(peer.cache_root() / f"llama-cpp-python-{peer.library_version()}")
    except Exception:  # llama-cpp-python not installed
        return None


@pytest.mark.slow  # llama.cpp's converter takes about 10 s a file
@pytest.mark.parametrize("version", [6, 7])
def test_same_tensors_as_llama_cpp_converter(tmp_path, checkpoints, reader, version):
    """Through `aviary convert` to a Hugging Face / fla folder and llama.cpp's convert_hf_to_gguf.py, the same bytes."""
    import os
    import subprocess

    pytest.importorskip("transformers")
    tree = llama_cpp_converter_tree()
    if tree is None:
        pytest.skip("llama.cpp's converter is not cached (python benchmarks/bench_inference.py fetches it)")
    folder = tmp_path / "hf"
    assert main(["convert", str(checkpoints[version]), str(folder)]) == 0
    (folder / WORLD_VOCAB.name).write_bytes(WORLD_VOCAB.read_bytes())
    theirs = tmp_path / "theirs.gguf"
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", "q8_0",
                    "--outfile", str(theirs)], check=True, capture_output=True, timeout=300, env=env)
    mine = reader(version, "q8_0")
    other = gguf.GGUFReader(theirs)
    assert {t.name: (t.tensor_type, t.data.tobytes()) for t in mine.tensors} == \
        {t.name: (t.tensor_type, t.data.tobytes()) for t in other.tensors}
    skip = {"general.name", "general.size_label", "tokenizer.chat_template"}  # ours: the file's name, own template
    assert {k: f.contents() for k, f in mine.fields.items() if k not in skip and not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in other.fields.items() if k not in skip and not k.startswith("GGUF.")}


# ---- the measurement for docs/checkpoints.md ---------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="llama.cpp's last-token logits vs Aviary fp32's on a random model")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tokens = torch.randint(1, 65530, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"random L{args.layers}-D{args.width}, {args.tokens} tokens: max |llama.cpp - Aviary fp32| over the "
          "last token's logits (logit std about 1)")
    with tempfile.TemporaryDirectory() as d:
        for version in (6, 7):
            src = Path(d) / f"rwkv{version}.pth"
            config = random_config(version, n_layer=args.layers, n_embd=args.width, vocab_size=65536)
            save_random_checkpoint(src, config, seed=0)
            ref = aviary_logits(src, tokens)
            sd = read_state_dict(src)[0]
            row = []
            for outtype in QTYPES:
                out = src.with_suffix(f".{outtype}.gguf")
                write_gguf(sd, out, outtype)
                diff = (llama_cpp_logits(out, tokens, args.threads) - ref).abs().max().item()
                row.append(f"{outtype} {diff:.1e}")
                out.unlink()
            print(f"  RWKV-{version}: " + ", ".join(row), flush=True)
