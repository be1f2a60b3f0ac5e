"""Chat messages -> a chat prompt, as token-aligned segments: the one rendering of a conversation behind the
server (`aviary serve`), `aviary chat` and chat training data (`aviary data prepare`). Three formats:

    world  (RWKV World, the default)        g1  (RWKV-7 G1 reasoning)           raven  (RWKV-4 Raven)
    System: <system prompt>\\n\\n              System: <system prompt>\\n\\n          <system prompt>\\n\\n
    User: <message>\\n\\n                      User: <message>\\n\\n                  Bob: <message>\\n\\n
    Assistant: <reply>\\n\\n                   Assistant: <reply>\\n\\n               Alice: <reply>\\n\\n
    User: <last message>\\n\\n                 User: <last message>\\n\\n             Bob: <last message>\\n\\n
    Assistant:                               Assistant: <think                    Alice:

The model continues from the last line; a blank line ends its reply. G1 (BlinkDL's RWKV7-G1x-templates.txt)
writes ">", its reasoning, "</think>", then the answer; with thinking off the prompt ends with the template's
empty think, "Assistant: <think>\\n</think", and the model writes ">" and the answer. A reasoning effort adds
the template's length hint to the last user message: "(think a bit)", "(think)", "(think a lot)".

A blank line separates turns, so blank lines inside a message are folded to single newlines, in every format
and by every caller (as the reference demos and the G1 template's `clean_txt` do). Each segment is tokenized
on its own and the token lists are concatenated, so the tokens of a conversation are a prefix of the tokens of
its continuation: the server's prefix cache then finds the state after the system prompt, or after the
whole earlier conversation, and only the new turn is computed. `prompt_tokens` returns the token counts
after each message for the cache. An assistant message is "Assistant:" + " reply\\n\\n" (a G1 message with
its reasoning: "Assistant:" + " <think" + ">\\n<reasoning>\\n</think>\\n<reply>\\n\\n"), so a reply the model
wrote after the prompt's reply segments extends that prompt's tokens.

Training data renders a finished conversation (`reply_prompt=False`: no reply prompt after the last reply)
and trains on the reply segments only (`chat_segments` says which they are): the tokens the model learns to
write are the ones it writes after the prompt the server feeds it.

Tool calls follow the G1 templates in every format: `tools_prompt` lists the tools in the system prompt, a
call is a ```json block (`tool_call_text`), a tool's result a "Function output:" user turn
(`tool_output_message`); the server parses and constrains them (aviary/serve/tool_calls.py).

A model's format is given by a flag, else recorded with the model (`recorded_format`), else "world"
(`format_for`). Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["EFFORTS", "FORMATS", "ROLES", "STOP", "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ChatFormat", "ChatMessage",
           "ReplySplitter", "chat_segments", "format_for", "get_format", "prompt_segments", "prompt_tokens",
           "recorded_format", "tool_call_text", "tool_output_message", "tools_prompt"]

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}  # role -> kind
STOP = ("\n\n",)  # the blank line that ends an assistant turn
EFFORTS = ("none", "minimal", "low", "medium", "high")  # OpenAI's reasoning_effort values
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str
    reasoning: str = ""  # an assistant message's reasoning (rendered by formats that have a think block)


def _clean(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()


@dataclass(frozen=True)
class Think:
    """How a format delimits reasoning: the reply prompt opens the block and leaves its closing ">" to the
    model (as the G1 template's prompts do), and the model ends its reasoning with `close`."""

    open: str = "<think"  # the reply prompt ends with it; the model writes `rest` first
    rest: str = ">"
    close: str = "</think>"
    off: str = "<think>\n</think"  # the empty think: thinking off, the model writes `rest` and the answer
    hints: tuple[tuple[str, str], ...] = (("minimal", "think a bit"), ("low", "think a bit"),
                                          ("medium", "think"), ("high", "think a lot"))


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: role labels, the separator that ends a turn, and how reasoning is delimited.

    `labels` maps each kind of turn (System, User, Assistant) to its label; a system label of None writes the
    system prompt as plain text (Raven's preamble). `stop` is what ends a reply: the separator, and a role
    label at the start of a line (the next turn, which generation must never emit)."""

    name: str
    labels: dict[str, str | None]
    separator: str = "\n\n"
    think: Think | None = None
    description: str = ""
    stop: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        turns = [self.labels["User"], self.labels["Assistant"]]
        object.__setattr__(self, "stop", (self.separator, *(f"\n{label}:" for label in turns)))

    def renamed(self, user: str | None = None, assistant: str | None = None) -> ChatFormat:
        """The same format with other names for the two sides (`aviary chat --user/--assistant`)."""
        labels = {**self.labels, **({"User": user} if user else {}), **({"Assistant": assistant} if assistant else {})}
        return replace(self, labels=labels)

    # ---- rendering ------------------------------------------------------------------------------------

    def reply_prompt(self, effort: str | None = None) -> list[str]:
        """The segments after the last message that the model continues from: "Assistant:", and for a
        format with reasoning " <think" (thinking), or the empty think when `effort` is "none"."""
        _check_effort(effort)
        segments = [f"{self.labels['Assistant']}:"]
        if self.think is not None:
            segments.append(" " + (self.think.off if effort == "none" else self.think.open))
        return segments

    def segments(self, messages: Sequence[ChatMessage], *, reply_prompt: bool = True,
                 effort: str | None = None) -> list[tuple[str, bool]]:
        """(segment, is_reply) for each segment of the prompt: is_reply marks the text of an assistant
        message (" reply\\n\\n", its closing blank line included), the tokens a chat fine-tune trains on.

        Leading system messages become one system segment; a system message later in the conversation is a
        turn of its own. `effort` (with a reply prompt only) adds the format's think-length hint to the last
        user message, or turns thinking off ("none")."""
        return [(text, is_reply) for text, is_reply, _ in self._segments(messages, reply_prompt, effort)]

    def _segments(self, messages: Sequence[ChatMessage], reply_prompt: bool,
                  effort: str | None) -> list[tuple[str, bool, bool]]:
        """(segment, is_reply, ends a message)."""
        if not messages:
            raise ValueError("messages must not be empty")
        _check_effort(effort)
        hint = dict(self.think.hints).get(effort) if self.think and reply_prompt else None
        last_user = max((i for i, m in enumerate(messages) if ROLES[m.role] == "User"), default=-1)
        sep, segments, i, leading = self.separator, [], 0, []
        while i < len(messages) and ROLES[messages[i].role] == "System":
            leading.append(_clean(messages[i].content))
            i += 1
        if any(leading):
            segments.append((self._turn("System", " ".join(s for s in leading if s)) + sep, False, True))
        for j, m in enumerate(messages[i:], i):
            kind, content = ROLES[m.role], _clean(m.content)
            if kind != "Assistant":
                if j == last_user and hint:
                    content = f"{content} ({hint})".lstrip()
                segments.append((self._turn(kind, content) + sep, False, True))
                continue
            segments.append((f"{self.labels['Assistant']}:", False, False))
            reasoning = _clean(m.reasoning)
            if self.think is not None and reasoning:  # as the model wrote it after the reply prompt
                t = self.think
                reply = f"{t.rest}\n{reasoning}\n{t.close}\n{content}{sep}"
                segments += [(" " + t.open, False, False), (reply, True, True)]
            else:
                segments.append((f" {content}{sep}", True, True))
        if reply_prompt:
            segments += [(s, False, False) for s in self.reply_prompt(effort)]
        return segments

    def answer_start(self) -> str:
        """What the model writes after `reply_prompt("none")` before its answer: a space after "Assistant:", or
        the think block's rest and a newline (G1: "<think>\\n</think" + ">\\n"). Constrained decoding starts
        its grammar with it (aviary.serve.tool_calls)."""
        return " " if self.think is None else f"{self.think.rest}\n"

    def _turn(self, kind: str, text: str) -> str:
        label = self.labels[kind]
        return text if label is None else f"{label}: {text}"

    def render(self, messages: Sequence[ChatMessage], *, reply_prompt: bool = True, effort: str | None = None) -> str:
        return "".join(s for s, _ in self.segments(messages, reply_prompt=reply_prompt, effort=effort))

    def tokens(self, messages: Sequence[ChatMessage], tokenizer, *, reply_prompt: bool = True,
               effort: str | None = None) -> tuple[list[int], list[int]]:
        """(prompt token ids, token counts at the end of each message) for the prefix cache."""
        tokens: list[int] = []
        boundaries: list[int] = []
        for segment, _, ends_message in self._segments(messages, reply_prompt, effort):
            tokens += tokenizer.encode(segment)
            if ends_message:
                boundaries.append(len(tokens))
        return tokens, boundaries

    def splitter(self, effort: str | None = None) -> ReplySplitter:
        """A splitter of the generated text that follows `reply_prompt(effort)` into reasoning and answer."""
        if self.think is None:
            return ReplySplitter()
        thinking = effort != "none"
        return ReplySplitter(expect=self.think.rest, close=self.think.close if thinking else None)

    def split(self, text: str, effort: str | None = None) -> tuple[str, str]:
        """(reasoning, answer) of a whole generated reply."""
        s = self.splitter(effort)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return r1 + r2, c1 + c2


def _check_effort(effort: str | None) -> None:
    if effort is not None and effort not in EFFORTS:
        raise ValueError(f"reasoning effort {effort!r}: expected one of {', '.join(EFFORTS)}")


class ReplySplitter:
    """Splits a reply, streamed in pieces cut anywhere, into reasoning and answer; the pieces of each add up
    to what `ChatFormat.split` gives for the whole text.

    The reply may start with `expect` (the rest of the think opener the prompt left to the model), which is
    dropped; then, when `close` is given, everything up to `close` is reasoning and the rest is the answer.
    Whitespace around both parts is trimmed, so text that might be a cut `close` or trailing whitespace is
    held back until the next piece tells what it is. A reply that never closes its reasoning is all reasoning.
    """

    def __init__(self, expect: str = "", close: str | None = None):
        self.expect, self.close = expect, close
        self.part = "opening" if expect else ("reasoning" if close else "answer")
        self.pending = ""  # text not yet given out
        self.started = False  # the current part has had non-whitespace text
        self.space = ""  # trailing whitespace of the reasoning, given out only if more reasoning follows

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) deltas that can be given out now."""
        self.pending += text
        reasoning = answer = ""
        if self.part == "opening":
            if len(self.pending) < len(self.expect) and self.expect.startswith(self.pending):
                return "", ""
            if self.pending.startswith(self.expect):
                self.pending = self.pending[len(self.expect):]
            self.part = "reasoning" if self.close else "answer"
        if self.part == "reasoning":
            at = self.pending.find(self.close)
            if at < 0:
                keep = _partial_suffix(self.pending, self.close)
                reasoning = self._give(self.pending[:len(self.pending) - keep], hold_space=True)
                self.pending = self.pending[len(self.pending) - keep:]
                return reasoning, ""
            reasoning = self._give(self.pending[:at], hold_space=True)
            self.pending = self.pending[at + len(self.close):]
            self.part, self.started, self.space = "answer", False, ""
        answer = self._give(self.pending, hold_space=False)
        self.pending = ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """Whatever is still held back, at the end of the reply."""
        if self.part == "opening":  # the reply was a prefix of `expect`: nothing to show
            self.pending, self.part = "", "reasoning" if self.close else "answer"
            return "", ""
        if self.part == "reasoning":  # never closed: a held-back partial `close` is reasoning text after all
            text = self._give(self.pending, hold_space=True)
            self.pending = ""
            return text, ""
        return "", ""

    def _give(self, text: str, hold_space: bool) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        if not hold_space:
            return text
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body):]
        return body


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


WORLD = ChatFormat("world", {"System": "System", "User": "User", "Assistant": "Assistant"},
                   description="RWKV World: User: / Assistant:, optional System:")
G1 = ChatFormat("g1", {"System": "System", "User": "User", "Assistant": "Assistant"}, think=Think(),
                description="RWKV-7 G1 reasoning: the World format, replies start with <think ... </think>")
RAVEN = ChatFormat("raven", {"System": None, "User": "Bob", "Assistant": "Alice"},
                   description="RWKV-4 Raven: Bob: / Alice:, the system prompt as a plain preamble")
FORMATS = {f.name: f for f in (WORLD, G1, RAVEN)}


def get_format(name: str | ChatFormat) -> ChatFormat:
    if isinstance(name, ChatFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat format {name!r}; the formats are {', '.join(FORMATS)}") from None


# ---- tool calls ----------------------------------------------------------------------------------------
# The convention of the G1 templates (RWKV7-G1x-templates.txt and the G1 function-calling data): the system
# prompt lists the tools as compact JSON, the reply is a ```json block holding {"name": ..., "arguments": {...}},
# and a tool's result comes back as a user turn "Function output: ...".

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "```json\n", "\n```"


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def tools_prompt(functions: Sequence[dict]) -> str:
    """The system prompt that offers `functions` (OpenAI's function objects: name, description, parameters)."""
    return f"Tools:\n{_compact(list(functions))}\nReturn only a JSON function call."


def tool_call_text(name: str, arguments) -> str:
    """One call as the model writes it (and as an assistant message that made it is rendered back)."""
    return f"{TOOL_CALL_OPEN}{_compact({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def tool_output_message(content: str) -> ChatMessage:
    """A tool's result (OpenAI's "tool" message) as the conversation's next turn."""
    return ChatMessage("user", f"Function output: {content}")


# ---- the format recorded with a model ------------------------------------------------------------------

SIDECAR = ".aviary.json"  # model.pth -> model.aviary.json; a folder -> folder/aviary.json
_NAMES = ((re.compile(r"rwkv7[a-z]?-g\d", re.I), "g1"), (re.compile(r"raven", re.I), "raven"))


def recorded_format(path: str | os.PathLike) -> tuple[str, str] | None:
    """(format name, where it was found) recorded with the checkpoint at `path`, or None. Looked for in order:

    1. a sidecar JSON `{"chat_format": NAME}`: `model.aviary.json` beside `model.pth` (or `.safetensors`,
       `.gguf`), `aviary.json` inside a model folder (written by hand; it never touches the weights);
    2. a `chat_format` entry in the safetensors header metadata (the file's, or a folder's model.safetensors);
    3. the official file name: `rwkv7-g1...` (and `rwkv7a-g1b`, ...) is G1, `...Raven...` is Raven.
    A sidecar that cannot be read, or names no known format, is an error: it was written to be obeyed."""
    p = Path(path)
    sidecar = p / SIDECAR.lstrip(".") if p.is_dir() else p.with_name(p.name.rsplit(".", 1)[0] + SIDECAR)
    if sidecar.is_file():
        try:
            name = json.loads(sidecar.read_text(encoding="utf-8"))["chat_format"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{sidecar}: expected a JSON object with a \"chat_format\" string ({e})") from None
        if not isinstance(name, str) or name not in FORMATS:
            raise ValueError(f"{sidecar}: chat_format {name!r} is not one of {', '.join(FORMATS)}")
        return name, str(sidecar)
    weights = p / "model.safetensors" if p.is_dir() else p
    if weights.suffix == ".safetensors" and weights.is_file():
        name = _safetensors_metadata(weights).get("chat_format")
        if name in FORMATS:
            return name, f"{weights} metadata"
    for pattern, name in _NAMES:
        if pattern.search(p.name):
            return name, f"the file name {p.name}"
    return None


def _safetensors_metadata(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n < 1 << 27 else {}
        meta = header.get("__metadata__") or {}
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, struct.error):
        return {}  # not a safetensors file after all: the loader reports that


def format_for(flag: str | None, model_path: str | os.PathLike | None = None) -> ChatFormat:
    """The chat format: the flag's, else the one recorded with the model, else "world"."""
    if flag is not None:
        return get_format(flag)
    found = recorded_format(model_path) if model_path is not None else None
    return get_format(found[0]) if found else WORLD


# ---- the World format, as the functions every caller used before formats had names ----------------------


def chat_segments(messages: Sequence[ChatMessage], *, reply_prompt: bool = True,
                  format: str | ChatFormat = "world") -> list[tuple[str, bool]]:
    """`ChatFormat.segments` of the named format (World by default)."""
    return get_format(format).segments(messages, reply_prompt=reply_prompt)


def prompt_segments(messages: Sequence[ChatMessage], *, reply_prompt: bool = True,
                    format: str | ChatFormat = "world") -> list[str]:
    """The prompt as a list of strings, one per message, then the reply prompt (unless `reply_prompt` is
    False: a finished conversation, as training data renders it)."""
    return [text for text, _ in chat_segments(messages, reply_prompt=reply_prompt, format=format)]


def prompt_tokens(messages: Sequence[ChatMessage], tokenizer, *, reply_prompt: bool = True,
                  format: str | ChatFormat = "world") -> tuple[list[int], list[int]]:
    """(prompt token ids, token counts at the end of each message) for the prefix cache."""
    return get_format(format).tokens(messages, tokenizer, reply_prompt=reply_prompt)
