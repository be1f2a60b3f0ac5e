"""Chat training data: conversations rendered token for token as the server renders them, a loss mask that
covers exactly the assistant's replies, clear errors for bad records, and NAME.mask checked when read."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aviary.chat_format import ChatMessage, prompt_segments, prompt_tokens
from aviary.cli import main
from aviary.train.data import BinIdx, DataError, prepare, write_binidx

CONVERSATION = [
    {"role": "system", "content": "You are a guide to Velmora."},
    {"role": "user", "content": "Where is Velmora?"},
    {"role": "assistant", "content": "In the Sarn Sea.\n\n\nEast of Oskell."},
    {"role": "user", "content": "And its capital?"},
    {"role": "assistant", "content": " Tiren Harbour. "},
]
RENDERED = ("System: You are a guide to Velmora.\n\nUser: Where is Velmora?\n\nAssistant: In the Sarn Sea.\nEast of "
            "Oskell.\n\nUser: And its capital?\n\nAssistant: Tiren Harbour.\n\n")
REPLIES = " In the Sarn Sea.\nEast of Oskell.\n\n Tiren Harbour.\n\n"


def fake_encode(texts):
    """One token per character (ids 1..96): positions in the rendered text are positions in the tokens."""
    return [[(ord(c) % 96) + 1 for c in t] for t in texts]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def prepared(tmp_path, records, name="chat.jsonl", **kw) -> BinIdx:
    prepare([write_jsonl(tmp_path / name, records)], tmp_path / "ds", encode_batch=fake_encode, progress=False, **kw)
    return BinIdx(tmp_path / "ds")


def messages(records):
    return [ChatMessage(m["role"], m["content"]) for m in records]


def test_mask_covers_exactly_the_assistant_replies(tmp_path):
    ds = prepared(tmp_path, [{"messages": CONVERSATION}])
    assert ds.has_mask and ds.n_documents == 1
    ids, mask = ds.document(0), ds.document_mask(0)
    assert ids.tolist() == fake_encode([RENDERED])[0] + [0]  # a finished conversation: no "Assistant:" after it
    assert "".join(RENDERED[i] for i in np.flatnonzero(mask[:-1])) == REPLIES  # every reply token, the "\n\n" too
    assert not mask[-1]  # the end-of-document id is context, not a target
    assert "".join(prompt_segments(messages(CONVERSATION), reply_prompt=False)) == RENDERED


def test_training_tokens_are_the_servers_tokens(tmp_path):
    """With the World tokenizer: the training document is the server's prompt for the conversation up to the
    last user turn, followed by the reply as the model would write it after that prompt."""
    pytest.importorskip("aviary.tokenizer")
    from aviary.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    prepare([write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])], tmp_path / "ds", progress=False)
    ds = BinIdx(tmp_path / "ds")
    ids, mask = ds.document(0).tolist(), ds.document_mask(0)
    whole, _ = prompt_tokens(messages(CONVERSATION), tok, reply_prompt=False)
    assert ids == whole + [0]
    served, _ = prompt_tokens(messages(CONVERSATION[:-1]), tok)  # ends with "Assistant:"
    reply = tok.encode(" Tiren Harbour.\n\n")
    assert ids[:len(served)] == served and ids[len(served):-1] == reply
    assert mask[len(served):-1].all() and not mask[-1]
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == REPLIES


def test_prompt_completion_is_one_user_and_one_assistant_turn(tmp_path):
    pair = prepared(tmp_path, [{"prompt": "Hi there", "completion": "Hello!", "id": 7}])
    ids, mask = pair.document(0), pair.document_mask(0)
    as_messages = prepared(tmp_path, [{"messages": [{"role": "user", "content": "Hi there"},
                                                    {"role": "assistant", "content": "Hello!"}]}], name="m.jsonl")
    rendered = fake_encode(["User: Hi there\n\nAssistant: Hello!\n\n"])[0] + [0]
    assert ids.tolist() == as_messages.document(0).tolist() == rendered
    assert mask.tolist() == as_messages.document_mask(0).tolist()
    assert int(mask.sum()) == len(" Hello!\n\n")


@pytest.mark.parametrize("chat_format, rendered, replies, shown", [
    ("g1", "User: Sum 2 and 3.\n\nAssistant: <think>\nTwo plus three.\n</think>\nFive.\n\n",
     ">\nTwo plus three.\n</think>\nFive.\n\n", "Assistant: <think[[>\nTwo plus three."),
    ("raven", "Bob: Sum 2 and 3.\n\nAlice: Five.\n\n", " Five.\n\n", "Alice:[[ Five."),
])
def test_another_chat_format_and_reasoning_to_train_on(tmp_path, capsys, chat_format, rendered, replies, shown):
    """--chat-format renders the conversations; in g1 a reply's reasoning_content is trained, after " <think"."""
    record = {"messages": [{"role": "user", "content": "Sum 2 and 3."},
                           {"role": "assistant", "content": "Five.", "reasoning_content": "Two plus three."}]}
    ds = prepared(tmp_path, [record], chat_format=chat_format)
    ids, mask = ds.document(0), ds.document_mask(0)
    assert ids.tolist() == fake_encode([rendered])[0] + [0]
    assert "".join(rendered[i] for i in np.flatnonzero(mask[:-1])) == replies
    src = write_jsonl(tmp_path / "cli.jsonl", [record])
    assert main(["data", "prepare", str(src), str(tmp_path / "cli"), "--quiet", "--chat-format", chat_format]) == 0
    assert main(["data", "inspect", str(tmp_path / "cli"), "--show", "1", "--ctx-len", "4"]) == 0
    assert shown in capsys.readouterr().out


def test_chat_and_text_files_in_one_dataset(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("plain")
    chat = write_jsonl(tmp_path / "c.json", [{"prompt": "a", "completion": "b"}])
    r = prepare([text, chat], tmp_path / "ds", encode_batch=fake_encode, progress=False)
    ds = BinIdx(tmp_path / "ds")
    assert (r.documents, r.conversations, r.mask_path) == (2, 1, tmp_path / "ds.mask")
    assert ds.document_mask(0).all()  # text is trained throughout, its end-of-document id too, as without a mask
    assert r.targets == len("plain") + 1 + len(" b\n\n") == int(ds.mask.sum())


def test_get_mask_lines_up_with_the_targets(tmp_path):
    ds = prepared(tmp_path, [{"prompt": "q", "completion": "yes"}, {"prompt": "q2", "completion": "no"}])
    T, o = 8, 5
    x, y, w = ds.get(o, T), ds.get(o + 1, T), ds.get_mask(o + 1, T)
    assert w.dtype == bool and w.tolist() == ds.mask[o + 1:o + 1 + T].astype(bool).tolist()
    assert (x[1:] == y[:-1]).all()
    with pytest.raises(IndexError):
        ds.get_mask(len(ds) - 2, 3)


BAD = [
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"message 1 has role 'tool'; the roles are system, developer, user, assistant"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "y"}]},
     r"message 1's content is an array, not a string"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, r"has no assistant message: nothing to train"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]},
     r"message 2 is an empty assistant reply"),
    ({"messages": "User: hi"}, r"'messages' is a string, not an array"),
    ({"messages": []}, r"'messages' is empty"),
    ({"messages": [{"role": "user"}]}, r"message 1 is not an object with 'role' and 'content'"),
    ({"prompt": "q"}, r"has no 'completion'"),
    ({"prompt": "q", "completion": 3}, r"'completion' is a number, not a string"),
    ({"prompt": "q", "completion": "a", "messages": []}, r"has both 'messages' and 'prompt'/'completion'"),
    ({"text": "a document"}, r"not a conversation: a chat file holds one"),
    ('{"prompt": "q", "completion": "a\\ud800"}', r"'completion' has a lone surrogate"),
    ('{"prompt": "q", ', r"not JSON"),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_records_name_the_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "fine", "completion": "yes"}, "", record])
    with pytest.raises(DataError, match=r"chat\.jsonl:3: " + message):
        prepare([path], tmp_path / "ds", encode_batch=fake_encode, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # nothing written, no temporary files


def test_format_per_file_auto_or_chosen(tmp_path):
    chat = write_jsonl(tmp_path / "c.txt", [{"prompt": "q", "completion": "a"}])
    assert prepared(tmp_path, [{"prompt": "q", "completion": "a"}]).has_mask  # *.jsonl, first record: auto
    prepare([chat], tmp_path / "doc", encode_batch=fake_encode, progress=False)  # not *.jsonl: one text document
    assert not BinIdx(tmp_path / "doc").has_mask
    prepare([chat], tmp_path / "c", encode_batch=fake_encode, progress=False, format="chat")
    assert BinIdx(tmp_path / "c").has_mask
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a document"}, {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: not a JSON object with a 'text' field \(it is a "
                                        r"conversation: a file holds documents or conversations, not both\)"):
        prepare([mixed], tmp_path / "x", encode_batch=fake_encode, progress=False)


def test_plain_text_datasets_have_no_mask(tmp_path):
    write_binidx(tmp_path / "plain", [[5, 6, 0], [7, 0]])
    ds = BinIdx(tmp_path / "plain")
    assert not ds.has_mask and ds.mask is None and not (tmp_path / "plain.mask").exists()
    assert ds.get_mask(1, 4).tolist() == [True] * 4


def test_a_text_dataset_replacing_a_chat_dataset_removes_its_mask(tmp_path):
    prepared(tmp_path, [{"prompt": "q", "completion": "a"}])
    assert (tmp_path / "ds.mask").exists()
    (tmp_path / "t.txt").write_text("text")
    prepare([tmp_path / "t.txt"], tmp_path / "ds", encode_batch=fake_encode, progress=False)
    assert not (tmp_path / "ds.mask").exists() and not BinIdx(tmp_path / "ds").has_mask


def _damaged_mask(tmp_path, edit):
    prepared(tmp_path, [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": "b"}])
    assert len(BinIdx(tmp_path / "ds")) == 49
    data = bytearray((tmp_path / "ds.mask").read_bytes())
    (tmp_path / "ds.mask").write_bytes(edit(data))
    return tmp_path / "ds"


@pytest.mark.parametrize("edit, message", [  # the dataset has 49 tokens
    (lambda d: d[:-1], r"ds\.mask: masks 49 tokens in 48 bytes, but the dataset has 49 tokens"),
    (lambda d: d + b"\x01", r"ds\.mask: masks 49 tokens in 50 bytes"),
    (lambda d: d[:16] + struct.pack("<Q", 50) + d[24:], r"ds\.mask: masks 50 tokens"),
    (lambda d: d[:-3] + b"\x02" + d[-2:], r"ds\.mask: token 46 has mask value 2; a mask holds only 0 and 1"),
    (lambda d: b"NOTAMASK" + d[8:], r"ds\.mask: not a loss mask \(bad magic"),
    (lambda d: d[:24] + struct.pack("<Q", 1234) + d[32:], r"ds\.mask: was written for documents of other sizes"),
])
def test_a_mask_that_does_not_fit_is_refused(tmp_path, edit, message):
    with pytest.raises(DataError, match=message):
        BinIdx(_damaged_mask(tmp_path, edit))


def test_cli_prepare_and_inspect_chat(tmp_path, capsys):
    pytest.importorskip("aviary.tokenizer")
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"prompt": "Hi", "completion": "Hello."}])
    out = str(tmp_path / "ds")
    assert main(["data", "prepare", str(src), out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ds.mask: 2 documents" in printed and "2 conversations" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "ds.bin", "ds.idx", "ds.mask"]
    assert main(["data", "prepare", str(src), out, "--quiet"]) == 2
    assert "ds.mask already exist; pass --force" in capsys.readouterr().err
    assert main(["data", "inspect", out, "--ctx-len", "8", "--show", "2"]) == 0
    printed = capsys.readouterr().out
    assert "are training targets" in printed
    assert "User: Hi\n\nAssistant:[[ Hello.\n\n]]" in printed
    assert "Assistant:[[ In the Sarn Sea.\nEast of Oskell.\n\n]]User: And its capital?" in printed


def test_cli_chat_prompt_is_the_servers():
    pytest.importorskip("aviary.tokenizer")
    from aviary.commands.chat import Chat
    from aviary.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    engine = SimpleNamespace(tokenizer=tok)
    message = "Two paragraphs:\n\nthe second one."
    served, _ = prompt_tokens([ChatMessage("user", message)], tok)
    assert Chat(engine, None, None).prompt(message) == served
    renamed = Chat(engine, None, None, user="Bob", assistant="Alice")
    assert tok.decode(renamed.prompt(message)) == "Bob: Two paragraphs:\nthe second one.\n\nAlice:"
    renamed.needs_separator = True
    assert tok.decode(renamed.prompt("hi")) == "\n\nBob: hi\n\nAlice:"


def test_the_demo_chat_dataset_prepares(tmp_path):
    demo = Path(__file__).parents[2] / "examples" / "data" / "chat-demo.jsonl"
    r = prepare([demo], tmp_path / "demo", encode_batch=fake_encode, progress=False)
    assert r.conversations == r.documents >= 40 and 0 < r.targets < r.tokens
