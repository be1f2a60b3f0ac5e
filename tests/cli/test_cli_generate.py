"""`aviary generate` and `aviary chat` on a small random-weight RWKV-7 with the World vocabulary size."""

import io

import pytest
import torch

import aviary
from aviary.cli import main
from aviary.generation import SamplingParams, generate
from aviary.state import RWKVState
from aviary.testing import random_config


def test_generate_prints_the_greedy_continuation(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "The Eiffel tower is in", "--temperature", "0", "-n", "8"]) == 0
    printed = capsys.readouterr().out
    model = aviary.load(checkpoint)
    expected = generate(model, aviary.load_tokenizer(version=7), "The Eiffel tower is in",
                        SamplingParams(temperature=0, max_new_tokens=8, presence_penalty=0.2,
                                       frequency_penalty=0.2, penalty_decay=0.996))
    assert printed == expected + "\n"


@pytest.mark.parametrize("flags, load_kwargs", [(["--quantize", "int8"], {"quantize": "int8"}),
                                                (["--dtype", "bfloat16"], {"dtype": "bfloat16"})])
def test_generate_loading_flags_reach_the_model(checkpoint, capsys, monkeypatch, flags, load_kwargs):
    prompt = "The Eiffel tower is in"
    real_load, seen = aviary.load, {}

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real_load(path, **kwargs)

    monkeypatch.setattr(aviary, "load", spy)
    assert main(["generate", str(checkpoint), prompt, "--temperature", "0", "-n", "6", *flags]) == 0
    assert all(seen[k] == v for k, v in load_kwargs.items())
    monkeypatch.undo()
    model = aviary.load(checkpoint, **load_kwargs)
    expected = generate(model, aviary.load_tokenizer(version=7), prompt,
                        SamplingParams(temperature=0, max_new_tokens=6, presence_penalty=0.2,
                                       frequency_penalty=0.2, penalty_decay=0.996))
    assert capsys.readouterr().out == expected + "\n"


def test_generate_reads_a_prompt_file_and_reports_speed(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    assert main(["generate", str(checkpoint), "--prompt-file", str(prompt), "-n", "4", "--seed", "1",
                 "--stats"]) == 0
    err = capsys.readouterr().err
    assert "decode 4 tokens" in err and "decode path: cpu " in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "missing.pth", "hi"], "no such checkpoint"),
    (["generate", "{ckpt}", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "{ckpt}", "hi", "--top-p", "0"], "top_p"),
    (["generate", "{ckpt}", ""], "empty"),
    (["generate", "{ckpt}", "a", "b", "c"], "PROMPT"),
    # devices are checked before the model is read (reliability probe, finding 10)
    (["generate", "{ckpt}", "hi", "--device", "gpu0"], "--device 'gpu0' is not a device name"),
    (["generate", "{ckpt}", "hi", "--device", "tpu"], "--device 'tpu' is not a device name"),
    (["generate", "{ckpt}", "hi", "--device", "meta"], "--device meta: Aviary runs on cpu, cuda and mps"),
    pytest.param(["generate", "{ckpt}", "hi", "--device", "cuda"], "--device cuda: no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["generate", "{ckpt}", "--prompt-file", "{binary}"], "binary.txt: not UTF-8 text (byte 0)"),
])
def test_generate_bad_input_is_one_clear_line(checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    argv = [a.replace("{ckpt}", str(checkpoint)).replace("{binary}", str(tmp_path / "binary.txt")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_chat_session_with_commands(checkpoint, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "conversation.state"
    script = "\n".join([
        "Hello there!",
        "/set temperature=0",
        "/set bogus=1",
        "/settings",
        "How are you?",
        f"/save {saved}",
        "/reset",
        f"/load {saved}",
        "/nonsense",
        "/quit",
    ])
    monkeypatch.setattr("sys.stdin", io.StringIO(script + "\n"))
    assert main(["chat", str(checkpoint), "-n", "6", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    # two replies (the settings lines also show "Assistant:", in the format's stop strings)
    assert sum(line.startswith("Assistant:") for line in out.splitlines()) == 2
    assert "temperature=0" in out and "state saved" in out and "state loaded" in out
    assert "NAME one of" in err and "unknown command" in err
    state = RWKVState.load(saved)
    aviary.load(checkpoint).check_state(state, 1)


def test_state_tuning_file_sets_the_starting_state(tmp_path, capsys):
    """An official state-tuning output (only blocks.N.att.time_state) given with --state generates exactly
    what the same weights with the time_state merged into the checkpoint generate."""
    from aviary.testing import random_state_dict

    cfg = random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=65536)
    sd = random_state_dict(cfg, seed=8, time_state=True)
    torch.save({k: v for k, v in sd.items() if k.endswith("time_state")}, tmp_path / "tuned.pth")
    torch.save({k: v for k, v in sd.items() if not k.endswith("time_state")}, tmp_path / "base.pth")
    torch.save(sd, tmp_path / "merged.pth")
    argv = ["hello", "--temperature", "0", "-n", "6"]
    assert main(["generate", str(tmp_path / "merged.pth"), *argv]) == 0
    merged = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "base.pth"), *argv, "--state", str(tmp_path / "tuned.pth")]) == 0
    assert capsys.readouterr().out == merged
    assert main(["generate", str(tmp_path / "base.pth"), *argv]) == 0
    assert capsys.readouterr().out != merged  # the tuned state really changes the output
    torch.save({"blocks.0.att.time_state": torch.zeros(3, 5, 5)}, tmp_path / "wrong.pth")
    assert main(["generate", str(tmp_path / "base.pth"), *argv, "--state", str(tmp_path / "wrong.pth")]) == 2
    assert "wrong.pth" in capsys.readouterr().err
