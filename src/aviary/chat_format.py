"""Chat messages -> the RWKV World chat prompt, as token-aligned segments: the one rendering of a conversation
behind the server (`aviary serve`), `aviary chat` and chat training data (`aviary data prepare`).

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

Training data renders a finished conversation (`reply_prompt=False`: no "Assistant:" after the last reply)
and trains on the reply segments only (`chat_segments` says which they are): the tokens the model learns to
write are the ones it writes after the prompt the server feeds it. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ROLES", "STOP", "ChatMessage", "chat_segments", "prompt_segments", "prompt_tokens"]

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STOP = ("\n\n",)  # the blank line that ends an assistant turn
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


def _clean(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()


def chat_segments(messages: Sequence[ChatMessage], *, reply_prompt: bool = True) -> list[tuple[str, bool]]:
    """(segment, is_reply) for each segment of `prompt_segments`: is_reply marks the text of an assistant
    message (" reply\\n\\n", its closing blank line included), the tokens a chat fine-tune trains on."""
    if not messages:
        raise ValueError("messages must not be empty")
    segments: list[tuple[str, bool]] = []
    i = 0
    leading = []
    while i < len(messages) and ROLES[messages[i].role] == "System":
        leading.append(_clean(messages[i].content))
        i += 1
    if any(leading):
        segments.append((f"System: {' '.join(s for s in leading if s)}\n\n", False))
    for m in messages[i:]:
        name = ROLES[m.role]
        if name == "Assistant":
            segments += [("Assistant:", False), (f" {_clean(m.content)}\n\n", True)]
        else:
            segments.append((f"{name}: {_clean(m.content)}\n\n", False))
    if reply_prompt:
        segments.append(("Assistant:", False))
    return segments


def prompt_segments(messages: Sequence[ChatMessage], *, reply_prompt: bool = True) -> list[str]:
    """The prompt as a list of strings, one per message, then "Assistant:" for the reply (unless
    `reply_prompt` is False: a finished conversation, as training data renders it).

    Leading system messages become one `System:` segment; a system message later in the conversation is
    its own `System:` turn. An assistant message is split as "Assistant:" + " reply\\n\\n", so a reply the
    model wrote (after the prompt's "Assistant:") extends that prompt's tokens.
    """
    return [text for text, _ in chat_segments(messages, reply_prompt=reply_prompt)]


def prompt_tokens(messages: Sequence[ChatMessage], tokenizer, *,
                  reply_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(prompt token ids, token counts at the end of each message) for the prefix cache."""
    tokens: list[int] = []
    boundaries: list[int] = []
    for segment in prompt_segments(messages, reply_prompt=reply_prompt):
        tokens += tokenizer.encode(segment)
        if segment != "Assistant:":  # the end of a message (the reply's "Assistant:" is not one)
            boundaries.append(len(tokens))
    return tokens, boundaries
