"""Every verb answers bad input the same way: one line on stderr, `aviary VERB: error: ...`, naming the file or
option, and exit code 2; never a traceback (reliability probe, findings 10 and 13). The cases run in-process
through `aviary.cli.main` on tiny random checkpoints; a case whose bug would start a server fails instead."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import random
import re
import struct

import pytest
import torch

from aviary.cli import COMMANDS, main
from aviary.testing import random_config, random_state_dict, save_random_checkpoint
from aviary.train.data import write_binidx

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad (and the few good) inputs the cases below name, as {name: path}."""
    d = tmp_path_factory.mktemp("bad")
    config = random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=300)
    good = d / "good.pth"
    save_random_checkpoint(good, config, seed=1)
    sd = random_state_dict(config, seed=1)
    sd["emb.weight"] = (sd["emb.weight"] * 100).long()
    torch.save(sd, d / "int.pth")
    (d / "cut.pth").write_bytes(good.read_bytes()[:5000])
    (d / "noise.state").write_bytes(bytes(range(256)) * 8)
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "exists.pth").write_bytes(b"")
    rng = random.Random(0)  # text that does not compress to under 64 KiB
    lines = "".join(json.dumps({"text": rng.randbytes(100).hex()}) + "\n" for _ in range(1500)).encode()
    for suffix, compress in ((".gz", gzip.compress), (".xz", lzma.compress)):
        (d / f"cut.jsonl{suffix}").write_bytes(compress(lines)[:65536])  # cut after its first 64 KiB
    (d / "ids.txt").write_text("1 2 3\n99999999\n")
    write_binidx(d / "data", [[1 + i % 60 for i in range(100)] + [0]] * 8)
    write_binidx(d / "huge", [[1, 2, 0]] * 4)
    idx = bytearray((d / "huge.idx").read_bytes())
    idx[18:26] = struct.pack("<Q", 2**40)  # an index claiming 2^40 documents
    (d / "huge.idx").write_bytes(idx)
    return {p.name: p for p in d.iterdir()} | {"dir": d}


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """A serve case that gets as far as starting the server is a failure, not a hang."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("the server would have started")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


T = ["train", "--data.train", "{data}", "--model.n_layer", "1", "--model.n_embd", "32", "--model.head_size", "16",
     "--model.vocab_size", "64", "--data.ctx_len", "16", "--out.dir", "{dir}/run", "--out.export", ""]

# (argv with {file} placeholders, text the error line must contain)
CASES = [
    pytest.param(["info", "{dir}/missing.pth"], "missing.pth", id="info-missing"),
    pytest.param(["info", "{cut.pth}"], "cut.pth", id="info-truncated"),
    pytest.param(["info", "{int.pth}"], "int.pth", id="info-int-tensors"),
    pytest.param(["info", "--bogus"], "--bogus", id="info-unknown-option"),
    pytest.param(["convert", "{dir}/missing.pth", "{dir}/out.safetensors"], "missing.pth", id="convert-missing"),
    pytest.param(["convert", "{good.pth}", "{exists.pth}"], "--force", id="convert-exists"),
    pytest.param(["convert", "{good.pth}", "{dir}/nodir/out.safetensors"], "nodir", id="convert-missing-dir"),
    pytest.param(["convert", "{good.pth}", "{dir}/nodir/out.pth"], "nodir", id="convert-missing-dir-pth"),
    pytest.param(["convert", "{int.pth}", "{dir}/int.safetensors"], "int.pth", id="convert-int-tensors"),
    pytest.param(["convert", "{good.pth}", "{dir}/x.pth", "--dtype", "float8"], "--dtype", id="convert-bad-dtype"),
    pytest.param(["merge", "{good.pth}", "{dir}/missing.pth", "{dir}/m.pth"], "missing.pth", id="merge-missing"),
    pytest.param(["merge", "{good.pth}", "{cut.pth}", "{dir}/m.pth"], "cut.pth", id="merge-truncated-adapter"),
    pytest.param(["merge", "{good.pth}", "{good.pth}", "{dir}/m.pth"], "no adapter tensors", id="merge-not-adapter"),
    pytest.param(["merge", "{good.pth}", "{good.pth}", "{exists.pth}"], "--force", id="merge-exists"),
    pytest.param(["generate", "{dir}/missing.pth", "hi"], "missing.pth", id="generate-missing"),
    pytest.param(["generate", "{good.pth}", "hi", "-n", "ten"], "--max-tokens", id="generate-bad-number"),
    pytest.param(["generate", "{good.pth}", "hi", "--temperature", "-1"], "temperature", id="generate-bad-value"),
    pytest.param(["generate", "{good.pth}", "hi", "--device", "gpu0"], "gpu0", id="generate-device-name"),
    pytest.param(["generate", "{good.pth}", "hi", "--backend", "cuda"], "RWKV-7 has no 'cuda' backend",
                 id="generate-backend-name"),
    pytest.param(["generate", "{good.pth}", "hi", "--device", "cuda"], "cuda", id="generate-device-cuda",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    pytest.param(["generate", "{good.pth}", "--prompt-file", "{binary.txt}"], "binary.txt",
                 id="generate-binary-prompt"),
    pytest.param(["generate", "{good.pth}", "hi", "--state", "{noise.state}"], "noise.state", id="generate-bad-state"),
    pytest.param(["generate", "{int.pth}", "hi"], "int.pth", id="generate-int-tensors"),
    pytest.param(["chat", "{dir}/missing.pth"], "missing.pth", id="chat-missing"),
    pytest.param(["chat", "{good.pth}", "--top-p", "0"], "top_p", id="chat-bad-value"),
    pytest.param(["chat", "{good.pth}", "--device", "gpu0"], "gpu0", id="chat-device-name"),
    pytest.param(["serve", "{dir}/missing.pth"], "missing.pth", id="serve-missing"),
    pytest.param(["serve", "{good.pth}", "--max-batch", "0"], "--max-batch", id="serve-bad-value"),
    pytest.param(["serve", "{good.pth}", "--port", "70000"], "port", id="serve-port"),
    pytest.param(["serve", "{good.pth}", "--api-key", ""], "api-key", id="serve-empty-key"),
    pytest.param(["serve", "{good.pth}", "--device", "gpu0"], "gpu0", id="serve-device-name"),
    pytest.param(["serve", "{good.pth}", "--replicas", "2"], "--ray", id="serve-replicas-without-ray"),
    pytest.param(["serve", "{good.pth}", "--ray-address", "auto"], "--ray", id="serve-ray-address-without-ray"),
    pytest.param(["serve", "{good.pth}", "--ray", "--replicas", "0"], "--replicas", id="serve-ray-no-replicas"),
    pytest.param(["serve", "{good.pth}", "--ray", "--port", "0"], "--port", id="serve-ray-any-port"),
    pytest.param(["serve", "{good.pth}", "--ray", "--max-connections", "8"], "--max-connections",
                 id="serve-ray-max-connections"),
    pytest.param(["serve", "{good.pth}", "--ray", "--threads", "0"], "--threads", id="serve-ray-threads"),
    pytest.param(["serve", "{dir}/missing.pth", "--ray"], "missing.pth", id="serve-ray-missing"),
    pytest.param(["tokenize", "encode", "{dir}/missing.txt"], "missing.txt", id="tokenize-missing"),
    pytest.param(["tokenize", "encode", "{cut.jsonl.xz}"], "cut.jsonl.xz", id="tokenize-truncated-xz"),
    pytest.param(["tokenize", "encode", "{cut.jsonl.gz}"], "cut.jsonl.gz", id="tokenize-truncated-gz"),
    pytest.param(["tokenize", "decode", "{ids.txt}"], "ids.txt", id="tokenize-bad-id"),
    pytest.param(["tokenize", "decode", "{binary.txt}"], "binary.txt", id="tokenize-binary"),
    pytest.param(["tokenize", "encode", "--tokenizer", "nosuch"], "nosuch", id="tokenize-unknown-tokenizer"),
    pytest.param(["data", "prepare", "{dir}/missing.txt", "{dir}/out"], "missing.txt", id="data-missing"),
    pytest.param(["data", "prepare", "{cut.jsonl.gz}", "{dir}/out"], "cut.jsonl.gz", id="data-truncated-gz"),
    pytest.param(["data", "prepare", "{cut.jsonl.xz}", "{dir}/out"], "cut.jsonl.xz", id="data-truncated-xz"),
    pytest.param(["data", "prepare", "{binary.txt}", "{dir}/data"], "--force", id="data-exists"),
    pytest.param(["data", "inspect", "{data}", "--ctx-len", "0"], "--ctx-len", id="data-ctx-len-0"),
    pytest.param(["data", "inspect", "{huge}"], "huge.idx", id="data-huge-index"),
    pytest.param(["data", "inspect", "{dir}/missing"], "missing.bin", id="data-inspect-missing"),
    pytest.param(["data"], "ACTION", id="data-no-action"),
    pytest.param(["eval", "ppl", "-m", "{good.pth}", "{dir}/missing.txt"], "missing.txt", id="eval-ppl-missing"),
    pytest.param(["eval", "ppl", "-m", "{good.pth}", "{cut.jsonl.xz}"], "cut.jsonl.xz", id="eval-ppl-truncated-xz"),
    pytest.param(["eval", "ppl", "-m", "{good.pth}", "--window", "0", "x"], "--window", id="eval-ppl-window-0"),
    pytest.param(["eval", "lambada", "-m", "{dir}/missing.pth"], "missing.pth", id="eval-lambada-missing-model"),
    pytest.param(["eval", "lambada", "-m", "{good.pth}", "--file", "{binary.txt}"], "binary.txt",
                 id="eval-lambada-binary"),
    pytest.param(["eval", "loss-by-position", "-m", "{good.pth}", "{binary.txt}", "--out", "{dir}/pos"], "binary.txt",
                 id="eval-positions-binary"),
    pytest.param(["eval", "compare", "-m", "{good.pth}", "--dtypes", "fp8"], "fp8", id="eval-compare-bad-dtype"),
    pytest.param(["eval"], "ACTION", id="eval-no-action"),
    pytest.param(["experiment"], "EXPERIMENT", id="experiment-none"),
    pytest.param(["experiment", "bogus"], "bogus", id="experiment-unknown"),
    pytest.param(["experiment", "mqar", "--models", "gpt5"], "gpt5", id="experiment-mqar-unknown-model"),
    pytest.param(["experiment", "mqar", "--steps", "0"], "--steps", id="experiment-mqar-steps-0"),
    pytest.param(["experiment", "long-context", "--docs", "{dir}/missing.jsonl"], "missing.jsonl",
                 id="experiment-long-context-missing-docs"),
    pytest.param(["experiment", "speed", "--ops", "wkv9"], "wkv9", id="experiment-speed-unknown-op"),
    pytest.param(["experiment", "mqar", "--device", "cuda"], "CUDA", id="experiment-mqar-no-cuda",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    pytest.param(["train", "{dir}/missing.yaml"], "missing.yaml", id="train-missing-config"),
    pytest.param(["train", "{binary.yaml}"], "binary.yaml", id="train-binary-config"),
    pytest.param([*T, "--train.device", "tpu"], "train.device", id="train-device-name"),
    pytest.param([*T, "--train.device", "cuda"], "train.device", id="train-device-cuda",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    pytest.param([*T, "--train.threads", "-1"], "train.threads", id="train-threads"),
    pytest.param([*T, "--train.max_steps", "0", "--train.epochs", "inf"], "train.epochs", id="train-epochs-inf"),
    pytest.param([*T, "--train.max_steps", "1e400"], "train.max_steps", id="train-max-steps-overflow"),
    pytest.param([*T, "--optim.lr_init", "inf"], "optim.lr_init", id="train-lr-inf"),
    pytest.param([*T, "--optim.grad_clip", "nan"], "optim.grad_clip", id="train-grad-clip-nan"),
    pytest.param([*T, "--out.val_samples", "0"], "out.val_samples", id="train-val-samples-0"),
    pytest.param([*T, "--train.micro_bsz", "eight"], "train.micro_bsz", id="train-bad-number"),
    pytest.param([*T, "--train.backend", "cuda"], "train.backend", id="train-backend-name"),
    pytest.param([*T, "--model.version", "4", "--train.backend", "fla"], "RWKV-4 has no 'fla'", id="train-backend-v4"),
    pytest.param([*T, "--model.load", "{good.pth}", "--train.backend", "bogus"], "train.backend: RWKV-7 has no 'bogus'",
                 id="train-backend-loaded-model"),
    pytest.param(["embed", "{good.pth}"], "no texts", id="embed-no-texts"),
    pytest.param(["embed", "{good.pth}", "hello"], "vocabulary", id="embed-token-outside-vocab"),
    pytest.param(["embed", "{good.pth}", "x", "-o", "{dir}/out.csv"], "--output", id="embed-bad-output"),
    pytest.param(["embed", "{good.pth}", "x", "--batch-size", "0"], "--batch-size", id="embed-batch-size-0"),
    pytest.param(["embed", "{good.pth}", "--file", "{binary.txt}"], "binary.txt", id="embed-binary-file"),
    pytest.param(["embed", "{good.pth}", "--file", "{cut.jsonl.xz}"], "cut.jsonl.xz", id="embed-truncated-xz"),
    pytest.param(["embed", "{good.pth}", "x", "--method", "emb-rwkv"], "good.pth", id="embed-not-emb-rwkv"),
]


@pytest.mark.parametrize("argv, needle", CASES)
def test_bad_input_is_one_line_and_exit_code_2(files, capsys, argv, needle):
    names = {"dir": str(files["dir"]), "data": str(files["dir"] / "data"), "huge": str(files["dir"] / "huge")}
    names |= {k: str(v) for k, v in files.items() if k != "dir"}
    argv = [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], a) for a in argv]
    verb = argv[0]
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1, (code, err)
    assert re.match(rf"aviary {verb}( [\w-]+)?: error: \S", lines[0]), lines[0]
    assert needle in lines[0], lines[0]


def test_every_verb_has_cases():
    verbs = {p.values[0][0] for p in CASES}
    assert verbs == set(COMMANDS)


def test_unknown_verb_is_one_line(capsys):
    code, err = run_cli(["bogus"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("aviary: error: ")


def test_chat_survives_a_bad_save(files, capsys, monkeypatch):
    """An error inside the chat (here /save into a missing folder) is one line, and the chat goes on."""
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/save {files['dir']}/nodir/x.state\n/settings\n"))
    code, err = run_cli(["chat", str(files["good.pth"]), "-n", "1"], capsys)
    assert code == 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "nodir" in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only bad input is shortened to one line: a bug (here a KeyError) still raises, with its traceback."""
    from aviary.commands import info

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(KeyError):
        main(["info", "x.pth"])


def test_warnings_are_one_line_naming_the_verb(monkeypatch, capsys):
    import warnings

    import aviary.commands.info as info

    def warn(args):
        warnings.warn("the logits are NaN", RuntimeWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(info, "run", warn)
    before = warnings.showwarning
    assert main(["info", "x.pth"]) == 0
    assert capsys.readouterr().err == "aviary info: warning: the logits are NaN\n"
    assert warnings.showwarning is before  # restored for the caller
