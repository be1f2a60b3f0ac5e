"""Chat messages -> the RWKV World chat prompt, as token-aligned segments.

    System: <system prompt>\\n\\n            (only if there is one; several system messages are joined)
    User: <message>\\n\\n
    Assistant: <reply>\\n\\n
    ...
    User: <last message>\\n\\n
    Assistant:                               <- the model continues from here; a blank line ends its reply

A blank line separates turns, so blank lines inside a message are folded to single newlines (as the
reference chat demo does). Each segment is tokenized on its own and the token lists are concatenated,
so the tokens of a conversation are a prefix of the tokens of its continuation: the server's prefix cache
then finds the state after the system prompt, or after the whole earlier conversation, and only the new
turn is computed. `prompt_tokens` returns the token counts after each message for the cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ROLES", "STOP", "ChatMessage", "prompt_segments", "prompt_tokens"]

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STOP = ("\n\n",)  # the blank line that ends an assistant turn
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


def _clean(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()


def prompt_segments(messages: Sequence[ChatMessage]) -> list[str]:
    """The prompt as a list of strings, one per message, then "Assistant:" for the reply.

    Leading system messages become one `System:` segment; a system message later in the conversation is
    its own `System:` turn. An assistant message is split as "Assistant:" + " reply\\n\\n", so a reply the
    model wrote (after the prompt's "Assistant:") extends that prompt's tokens.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    segments: list[str] = []
    i = 0
    leading = []
    while i < len(messages) and ROLES[messages[i].role] == "System":
        leading.append(_clean(messages[i].content))
        i += 1
    if any(leading):
        segments.append(f"System: {' '.join(s for s in leading if s)}\n\n")
    for m in messages[i:]:
        name = ROLES[m.role]
        if name == "Assistant":
            segments += ["Assistant:", f" {_clean(m.content)}\n\n"]
        else:
            segments.append(f"{name}: {_clean(m.content)}\n\n")
    segments.append("Assistant:")
    return segments


def prompt_tokens(messages: Sequence[ChatMessage], tokenizer) -> tuple[list[int], list[int]]:
    """(prompt token ids, token counts at the end of each message) for the prefix cache."""
    tokens: list[int] = []
    boundaries: list[int] = []
    for segment in prompt_segments(messages):
        tokens += tokenizer.encode(segment)
        if segment != "Assistant:":  # the end of a message (the reply's "Assistant:" is not one)
            boundaries.append(len(tokens))
    return tokens, boundaries
