"""Chat formats (aviary.chat_format): each format's exact rendering, the prefix property (a conversation's tokens
begin its continuation's), training tokens == served prompt + the reply the model writes, the reasoning split
whatever the streamed pieces (a `</think>` cut anywhere), stop strings that end a reply before the next turn's
role label, and where the format comes from (flag > recorded with the model > world)."""

from __future__ import annotations

import itertools
import json
import random
import struct

import pytest
import torch

from aviary.chat_format import (
    FORMATS,
    ChatMessage,
    format_for,
    get_format,
    prompt_segments,
    prompt_tokens,
    recorded_format,
)
from aviary.generation import SamplingParams
from aviary.generation.engine import SequenceOutput, _Running

torch.set_num_threads(1)

CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Hi\n\n\nthere"),
    ChatMessage("assistant", " Hello! "),
    ChatMessage("user", "Sum 2 and 3."),
]


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("aviary.tokenizer")
    from aviary.tokenizer import WorldTokenizer

    return WorldTokenizer()


# ---- exact renderings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, effort, expected", [
    ("world", None, "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Sum 2 and 3.\n\nAssistant:"),
    ("g1", None, "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Sum 2 and 3.\n\n"
                 "Assistant: <think"),
    ("g1", "none", "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Sum 2 and 3.\n\n"
                   "Assistant: <think>\n</think"),
    ("g1", "low", "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Sum 2 and 3. (think a bit)\n\n"
                  "Assistant: <think"),
    ("g1", "high", "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Sum 2 and 3. (think a lot)\n\n"
                   "Assistant: <think"),
    ("raven", None, "Be brief.\n\nBob: Hi\nthere\n\nAlice: Hello!\n\nBob: Sum 2 and 3.\n\nAlice:"),
])
def test_each_format_renders_exactly(name, effort, expected):
    assert get_format(name).render(CONVERSATION, effort=effort) == expected


def test_world_is_the_default_of_the_old_functions():
    assert "".join(prompt_segments(CONVERSATION)) == get_format("world").render(CONVERSATION)
    assert "".join(prompt_segments(CONVERSATION, format="raven")) == get_format("raven").render(CONVERSATION)


def test_a_g1_reply_with_reasoning_renders_its_think_block_and_trains_on_it():
    g1 = get_format("g1")
    finished = [ChatMessage("user", "Sum 2 and 3."), ChatMessage("assistant", "5.", reasoning="2 + 3\n\n= 5")]
    segments = g1.segments(finished, reply_prompt=False)
    assert segments == [("User: Sum 2 and 3.\n\n", False), ("Assistant:", False), (" <think", False),
                        (">\n2 + 3\n= 5\n</think>\n5.\n\n", True)]
    # world has no think block: the reasoning is not part of the prompt
    assert get_format("world").render(finished, reply_prompt=False) == "User: Sum 2 and 3.\n\nAssistant: 5.\n\n"


def test_blank_lines_fold_in_every_message_and_format():
    messy = [ChatMessage("system", "a\r\n\r\nb"), ChatMessage("user", "c\n \n\nd"),
             ChatMessage("assistant", "e\n\n\nf", reasoning="g\n\nh"), ChatMessage("user", "i")]
    for fmt in FORMATS.values():
        turns = fmt.render(messy).split(fmt.separator)
        assert len(turns) == 5, fmt.name  # system, user, assistant, user, reply prompt: no blank line inside one


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        get_format("g1").segments([])
    with pytest.raises(ValueError, match="unknown chat format 'chatml'"):
        get_format("chatml")
    with pytest.raises(ValueError, match="reasoning effort 'max'"):
        get_format("g1").render(CONVERSATION, effort="max")


# ---- token prefixes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_conversations_tokens_are_a_prefix_of_its_continuations(tok, name):
    fmt = get_format(name)
    longer = [*CONVERSATION, ChatMessage("assistant", "5."), ChatMessage("user", "Thanks\n\n!")]
    whole, whole_ends = fmt.tokens(longer, tok, reply_prompt=False)
    for k in range(1, len(longer)):
        part, ends = fmt.tokens(longer[:k], tok, reply_prompt=False)
        assert whole[:len(part)] == part and whole_ends[:len(ends)] == ends and ends[-1] == len(part)
        prompt, prompt_ends = fmt.tokens(longer[:k], tok)  # with the reply prompt: the message ends are the same
        assert prompt[:len(part)] == part and prompt_ends == ends
    assert len(whole_ends) == len(longer)  # one end per message
    if fmt.think is None:  # the reply prompt ("Assistant:") begins the reply's own rendering
        prompt, _ = fmt.tokens(longer[:4], tok)
        assert whole[:len(prompt)] == prompt


def test_g1_training_tokens_are_the_served_prompt_and_the_reply_the_model_writes(tok):
    g1 = get_format("g1")
    reply = ChatMessage("assistant", "5.", reasoning="2 + 3 = 5")
    served, _ = g1.tokens(CONVERSATION, tok)  # ends with "Assistant: <think"
    trained, _ = g1.tokens([*CONVERSATION, reply], tok, reply_prompt=False)
    written = ">\n2 + 3 = 5\n</think>\n5.\n\n"
    assert trained == served + tok.encode(written)
    assert g1.split(written.removesuffix("\n\n")) == ("2 + 3 = 5", "5.")


def test_prompt_tokens_marks_message_ends(tok):
    tokens, ends = prompt_tokens(CONVERSATION, tok, format="g1")
    assert tok.decode(tokens[:ends[0]]) == "System: Be brief.\n\n"
    assert tok.decode(tokens[ends[-1]:]) == "Assistant: <think"


# ---- the reasoning split -------------------------------------------------------------------------------------


REPLIES = [
    ">\nLet me add.\n2 + 3 = 5\n</think>\nThe sum is 5.",
    "> thinking </think> answer </think> more",
    ">\n\n</think>\n\n",
    ">unfinished thought </thi",  # cut by max_tokens inside the closing tag: all reasoning
    "no opener, </think>answer",
    ">",
    "",
    ">  a  </think",
]


def pieces(text: str, cuts: tuple[int, ...]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def streamed(fmt, text, cuts, effort=None):
    s = fmt.splitter(effort)
    parts = [s.feed(p) for p in pieces(text, cuts)] + [s.finish()]
    return "".join(r for r, _ in parts), "".join(a for _, a in parts)


@pytest.mark.parametrize("text", REPLIES)
@pytest.mark.parametrize("effort", [None, "none"])
def test_streamed_pieces_split_as_the_whole_reply(text, effort):
    g1 = get_format("g1")
    whole = g1.split(text, effort)
    for i in range(len(text) + 1):  # every cut in two pieces, and every cut in two of the text around </think>
        assert streamed(g1, text, (i,), effort) == whole, (text, i)
    rng = random.Random(0)
    for _ in range(200):
        cuts = tuple(sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(1, 6)))))
        assert streamed(g1, text, cuts, effort) == whole, (text, cuts)
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert streamed(g1, text, (i, j), effort) == whole, (text, i, j)


def test_what_the_split_gives():
    g1 = get_format("g1")
    assert g1.split(REPLIES[0]) == ("Let me add.\n2 + 3 = 5", "The sum is 5.")
    assert g1.split(REPLIES[1]) == ("thinking", "answer </think> more")  # the first </think> closes it
    assert g1.split(REPLIES[2]) == ("", "")
    assert g1.split(REPLIES[3]) == ("unfinished thought </thi", "")
    assert g1.split(REPLIES[4]) == ("no opener,", "answer")
    assert g1.split("> The answer.", effort="none") == ("", "The answer.")  # thinking off: all answer
    assert get_format("world").split(" Hello </think> there ") == ("", "Hello </think> there ")
    s = g1.splitter()
    assert s.feed(">\nStep one. </th") == ("Step one.", "")  # the space and the cut tag wait for the next piece
    assert s.feed("ink> Five") == ("", "Five")
    assert s.finish() == ("", "")


# ---- stop strings --------------------------------------------------------------------------------------------


def release_all(params: SamplingParams, text_pieces: list[str]) -> tuple[str, str | None]:
    """The text the engine shows for these decoded pieces, and why it stopped (the engine's own stop logic)."""
    out = SequenceOutput([1], params)
    run = _Running(out, 16, None)
    for piece in text_pieces:
        run.release(piece)
        if out.finished:
            break
    if not out.finished:
        run.release("", final=True)
    return out.text, out.finish_reason


@pytest.mark.parametrize("name, label", [("world", "User"), ("g1", "User"), ("raven", "Bob")])
def test_a_reply_stops_before_the_next_turns_role_label(name, label):
    fmt = get_format(name)
    assert fmt.stop[0] == "\n\n" and f"\n{label}:" in fmt.stop
    params = SamplingParams(stop=fmt.stop)
    for rest in ("\n\n", f"\n\n{label}: and you?", f"\n{label}: and you?", f"\n{fmt.labels['Assistant']}: again"):
        text, reason = release_all(params, [" Fine", ",", " thanks.", *rest])  # the rest one character a piece
        assert (text, reason) == (" Fine, thanks.", "stop"), rest
    assert release_all(params, [" Fine.", "\nMore"]) == (" Fine.\nMore", None)  # a single newline goes on
    assert get_format(name).renamed(user="Ann").stop == ("\n\n", "\nAnn:", f"\n{fmt.labels['Assistant']}:")


# ---- where the format comes from ------------------------------------------------------------------------------


def safetensors_with(path, metadata: dict):
    header = json.dumps({"__metadata__": metadata}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_flag_then_recorded_then_world(tmp_path):
    plain = tmp_path / "model.pth"
    plain.write_bytes(b"")
    assert recorded_format(plain) is None and format_for(None, plain).name == "world"
    assert format_for("raven", plain).name == "raven"
    (tmp_path / "model.aviary.json").write_text('{"chat_format": "g1"}')
    assert recorded_format(plain) == ("g1", str(tmp_path / "model.aviary.json"))
    assert format_for(None, plain).name == "g1" and format_for("world", plain).name == "world"

    meta = safetensors_with(tmp_path / "tuned.safetensors", {"format": "pt", "chat_format": "raven"})
    assert recorded_format(meta) == ("raven", f"{meta} metadata")
    folder = tmp_path / "folder"
    folder.mkdir()
    safetensors_with(folder / "model.safetensors", {"chat_format": "g1"})
    assert recorded_format(folder)[0] == "g1"
    (folder / "aviary.json").write_text('{"chat_format": "world"}')
    assert recorded_format(folder)[0] == "world"  # the sidecar comes before the metadata

    for name, expected in [("rwkv7-g1a-0.1b-20250728-ctx4096.pth", "g1"), ("rwkv7a-g1b-0.1b-20250819.pth", "g1"),
                           ("RWKV-4-Raven-3B-v12-Eng98%-Other2%-20230520-ctx4096.pth", "raven"),
                           ("RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", None)]:
        assert (recorded_format(tmp_path / name) or (None,))[0] == expected, name


@pytest.mark.parametrize("content", ['{"chat_format": "chatml"}', "not json", '{"format": "g1"}', '{"chat_format": 1}'])
def test_a_sidecar_that_cannot_be_obeyed_is_an_error(tmp_path, content):
    (tmp_path / "m.aviary.json").write_text(content)
    with pytest.raises(ValueError, match="m.aviary.json"):
        format_for(None, tmp_path / "m.pth")
