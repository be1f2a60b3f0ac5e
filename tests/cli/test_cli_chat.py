"""`aviary chat` keeps the conversation through every mistake a user can make, and state files are checked
when they are read (reliability probe, findings 8, 12 and 13)."""

import io
import os

import pytest
import torch
from safetensors.torch import save_file

import aviary
from aviary.cli import main
from aviary.commands.chat import Chat
from aviary.generation import Engine, SamplingParams
from aviary.state import RWKVState, StateError


@pytest.fixture(scope="module")
def model(checkpoint):
    return aviary.load(checkpoint)


def chat(checkpoint, monkeypatch, capsys, *lines, args=()):
    """Run `aviary chat` on these input lines -> (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(["chat", str(checkpoint), "-n", "3", "--seed", "0", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write_state(path, shift, wkv, **meta):
    meta = {"format": "aviary-state", **meta}
    save_file({"shift": shift.contiguous(), "wkv": wkv.contiguous()}, str(path), metadata=meta)
    return path


def test_save_to_a_missing_directory_keeps_the_conversation(checkpoint, monkeypatch, capsys, tmp_path):
    good = tmp_path / "good.state"
    code, out, err = chat(checkpoint, monkeypatch, capsys,
                          "Hello", f"/save {tmp_path / 'nodir' / 'x.state'}", f"/save {tmp_path}", "/save",
                          "Still there?", f"/save {good}")
    assert code == 0, err
    assert "Traceback" not in err
    assert err.count("error:") == 3 and "no such directory" in err and "is a directory" in err
    assert "use /save FILE" in err
    assert out.count("Assistant:") == 2 and "state saved" in out
    assert RWKVState.load(good).version == 7
    assert not list((tmp_path).glob("*.tmp"))


def test_save_refuses_to_replace_a_device_or_pipe(model, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        model.init_state(1).save(fifo)
    assert fifo.is_fifo()


def test_set_checks_token_ids_against_the_vocabulary(checkpoint, monkeypatch, capsys):
    code, out, err = chat(checkpoint, monkeypatch, capsys,
                          "/set banned_tokens=99999999", "/set stop_token_ids=0,70000", "/set top_p=7", "Hello")
    assert code == 0, err
    assert err.count("outside the vocabulary") == 2 and "top_p" in err
    assert out.count("Assistant:") == 1 and "Traceback" not in err


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_states_of_another_float_precision_are_converted(model, tmp_path, dtype):
    s = model(torch.tensor([[1, 2, 3]]))[1]
    path = write_state(tmp_path / "s.state", s.shift.to(dtype), s.wkv.to(dtype), version="7")
    loaded = RWKVState.load(path)
    assert loaded.shift.dtype == loaded.wkv.dtype == torch.float32
    model.check_state(loaded, 1)
    torch.testing.assert_close(loaded.wkv, s.wkv.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("case, match", [
    ("bool", "torch.bool; a state is float32"),
    ("int", "torch.int64; a state is float32"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("no version", "no 'version'"),
    ("bad version", "'abc' is not a number"),
    ("no wkv", "no wkv tensor"),
])
def test_bad_state_files_are_state_errors_naming_the_file(model, tmp_path, case, match):
    s = model.init_state(1)
    shift, wkv, meta = s.shift, s.wkv, {"version": "7"}
    if case == "bool":
        wkv = wkv.bool()
    elif case == "int":
        shift = shift.long()
    elif case in ("nan", "inf"):
        wkv = wkv.clone()
        wkv[0, 0, 0, 0, 0] = float(case)
    elif case == "no version":
        meta = {}
    elif case == "bad version":
        meta = {"version": "abc"}
    path = tmp_path / "bad.state"
    if case == "no wkv":
        save_file({"shift": shift.contiguous()}, str(path), metadata={"format": "aviary-state", "version": "7"})
    else:
        write_state(path, shift, wkv, **meta)
    with pytest.raises(StateError, match=match) as e:
        RWKVState.load(path)
    assert str(path) in str(e.value)


def test_bad_state_file_in_chat_load_and_on_the_command_line(checkpoint, model, monkeypatch, capsys, tmp_path):
    s = model.init_state(1)
    bad = write_state(tmp_path / "bool.state", s.shift, s.wkv.bool(), version="7")
    code, out, err = chat(checkpoint, monkeypatch, capsys, f"/load {bad}", "Hello")
    assert code == 0 and "Traceback" not in err and "bool.state" in err
    assert out.count("Assistant:") == 1
    code, out, err = chat(checkpoint, monkeypatch, capsys, "Hello", args=("--state", str(bad)))
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith("aviary chat: error:") and len(err.strip().splitlines()) == 1


def test_check_state_refuses_a_state_that_is_not_float32(model):
    s = model.init_state(1)
    with pytest.raises(StateError, match="float32"):
        model(torch.tensor([[1]]), RWKVState(7, s.shift.half(), s.wkv))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("failure", [KeyboardInterrupt, Boom])
def test_a_failed_or_interrupted_reply_keeps_the_state_from_before_it(model, monkeypatch, failure):
    tok = aviary.load_tokenizer(version=7)
    engine = Engine(model, tok)
    c = Chat(engine, SamplingParams(max_new_tokens=4, temperature=0), None)
    c.turn("Hello", out=io.StringIO())
    before = c.state
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise failure()
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(failure):
        c.turn("And then?", out=io.StringIO())
    assert c.state is before and not engine.has_work
    monkeypatch.setattr(engine, "step", real_step)
    c.turn("And then?", out=io.StringIO())  # the chat goes on from the state before the failed turn
    assert c.state is not before


def test_chat_survives_an_error_inside_a_reply(checkpoint, monkeypatch, capsys):
    real_step, calls = Engine.step, []

    def failing_step(self):
        calls.append(1)
        if len(calls) == 1:
            raise Boom("simulated failure in a decode step")
        return real_step(self)

    monkeypatch.setattr(Engine, "step", failing_step)
    code, out, err = chat(checkpoint, monkeypatch, capsys, "Hello", "Again")
    assert code == 0
    assert "simulated failure" in err and "conversation continues" in err
    assert out.count("Assistant:") == 2


def test_nonfinite_logits_give_a_warning(model):
    tok = aviary.load_tokenizer(version=7)
    s = model.init_state(1)
    broken = RWKVState(7, s.shift, torch.full_like(s.wkv, float("nan")))
    with pytest.warns(RuntimeWarning, match="NaN or"):
        Chat(Engine(model, tok), SamplingParams(max_new_tokens=2), broken).turn("Hi", out=io.StringIO())


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_a_broken_state_tuning_file_is_refused(checkpoint, model, monkeypatch, capsys, tmp_path, bad):
    cfg = model.config
    wkv = model.init_state(1).wkv[0].transpose(-1, -2)  # [L, H, V, K], the official orientation
    wkv = wkv.long() if bad == "int" else torch.full_like(wkv, float("nan"))
    torch.save({f"blocks.{i}.att.time_state": wkv[i] for i in range(cfg.n_layer)}, tmp_path / "tuned.pth")
    code, out, err = chat(checkpoint, monkeypatch, capsys, "Hello", args=("--state", str(tmp_path / "tuned.pth")))
    assert code == 2 and "tuned.pth" in err and "time_state" in err and "Traceback" not in err


class ScriptedChatEngine:
    """What `Chat` uses of an Engine: each reply is the next script, one piece a step, then a stop."""

    vocab_size = 65536

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts, self.prompts = tokenizer, list(scripts), []
        self.has_work = False

    def add(self, prompt, params, state=None):
        from aviary.generation.engine import SequenceOutput

        self.prompts.append(self.tokenizer.decode(prompt))
        self.seq, self.pieces, self.has_work = SequenceOutput(prompt, params), self.scripts.pop(0), True
        return self.seq

    def step(self):
        piece = self.pieces.pop(0)
        self.seq.tokens += self.tokenizer.encode(piece)
        if not self.pieces:
            self.seq.finish_reason, self.has_work = "stop", False
        return [(self.seq, "" if piece == "\n\n" else piece)]  # the stop string: in the tokens, not the text

    def cancel(self, seq):
        self.has_work = False


@pytest.mark.parametrize("color", [False, True])
def test_g1_reasoning_is_shown_apart_and_the_system_prompt_goes_first(color):
    from aviary.commands.chat import DIM, RESET

    tok = aviary.load_tokenizer(version=7)
    engine = ScriptedChatEngine(tok, [[">", "\nAdd.", "\n</th", "ink>\n", "Five.", "\n\n"], ["> Nine.", "\n\n"]])
    c = Chat(engine, SamplingParams(), None, chat_format="g1", system="Be brief.", color=color)
    out = io.StringIO()
    assert c.turn("2 + 3?", out=out) == "Five."
    shown = f" {DIM}Add.{RESET}\n Five.\n" if color else " <think> Add. </think>\nFive.\n"
    assert out.getvalue() == shown.replace("\n Five", "\nFive")
    assert engine.prompts[-1] == "System: Be brief.\n\nUser: 2 + 3?\n\nAssistant: <think"
    c.effort = "none"
    assert c.turn("4 + 5?", out=io.StringIO()) == "Nine."  # the system prompt only once; the reply's \n\n ended it
    assert engine.prompts[-1] == "User: 4 + 5?\n\nAssistant: <think>\n</think"
    c.reset()
    assert tok.decode(c.prompt("hi")) == "System: Be brief.\n\nUser: hi\n\nAssistant: <think>\n</think"
