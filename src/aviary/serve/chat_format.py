"""The chat formats (world, g1, raven) live in `aviary.chat_format` (the server, `aviary chat` and chat training
data share them); this name stays for existing imports."""

from aviary.chat_format import ROLES, STOP, ChatMessage, chat_segments, prompt_segments, prompt_tokens

__all__ = ["ROLES", "STOP", "ChatMessage", "chat_segments", "prompt_segments", "prompt_tokens"]
