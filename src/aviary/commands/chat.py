"""Talk to an RWKV model, turn by turn, in its chat format (--chat-format; default: the one recorded with the
model, else the RWKV World format):

    User: <your message>

    Assistant: <the reply>

A G1 model (--chat-format g1) thinks first: its reasoning is shown dimmed (between <think> and </think> when
the output is not a terminal), then the answer; --reasoning-effort none turns thinking off, low/medium/high
ask for less or more. The whole conversation lives in the recurrent state (a few MB however long it gets),
so each turn only runs the new message. Type a message and press Enter; lines that start with / are commands:

  /reset              forget the conversation (back to the starting state)
  /save FILE          write the conversation's state to FILE (safetensors)
  /load FILE          continue from a state saved with /save
  /set NAME=VALUE     change a sampling setting, e.g. /set temperature=0.7 or /set max_new_tokens=300
  /settings           show the sampling settings
  /help               this list
  /quit               leave (Ctrl-D works too)

examples:
  aviary chat
  aviary chat RWKV-x070-World-1.5B.pth --temperature 1.0 --top-p 0.3 --system "You are a pirate."
  aviary chat rwkv7-g1a-0.1b-20250728-ctx4096.pth --reasoning-effort low
  aviary chat model.pth --state my-conversation.state
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

from aviary.chat_format import EFFORTS, ChatMessage, format_for, get_format
from aviary.commands._common import (
    add_chat_format_argument,
    add_model_arguments,
    add_sampling_arguments,
    load_model,
    parse_setting,
    resolve_model_path,
    sampling_params,
)

HELP = "interactive multi-turn chat, with the conversation's state saved and loaded on request"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint (default: the bundled model)")
    add_chat_format_argument(parser)
    parser.add_argument("--system", default="", metavar="TEXT", help="a system prompt, before the first message")
    parser.add_argument("--reasoning-effort", choices=EFFORTS, default=None,
                        help="for formats that think (g1): none turns thinking off; minimal/low, medium, high add "
                             "the format's think-length hint to each message (default: think, no hint)")
    parser.add_argument("--user", default=None, help="the name of your turns (default: the format's, User)")
    parser.add_argument("--assistant", default=None,
                        help="the name of the model's turns (default: the format's, Assistant)")
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_tokens=500)


class Chat:
    """The conversation: a state, plus whether the last reply ended cleanly with its blank line."""

    def __init__(self, engine, params, start_state, user: str | None = None, assistant: str | None = None, *,
                 chat_format="world", system: str = "", effort: str | None = None, color: bool = False):
        self.engine, self.params = engine, params
        self.start_state = start_state
        self.format = get_format(chat_format).renamed(user, assistant)
        self.system, self.effort, self.color = system, effort, color
        self.format.reply_prompt(effort)  # an unknown effort: refused now, not at the first message
        self.reset()

    def reset(self) -> None:
        self.state = self.start_state
        self.needs_separator = False
        self.fresh = True  # the system prompt goes before the next message

    def turn(self, message: str, out=None) -> str:
        """Send one user message, stream the reply to `out` (stdout), keep the state for the next turn, and
        return the answer (without its reasoning)."""
        out = out or sys.stdout
        seq = self.engine.add(self.prompt(message), self.params, state=self.state)
        shown = _Shown(out, self.format.splitter(self.effort), self.color)
        try:
            while self.engine.has_work:
                for _, piece in self.engine.step():
                    shown.write(piece)
            shown.write("", final=True)
            shown.close()
        except BaseException:  # Ctrl-C or an error mid-reply: drop the reply, keep the state from before it
            self.engine.cancel(seq)
            shown.close()
            out.write("\n")
            raise
        out.write("\n")
        # the state after every token that was fed back; a reply cut by the separator (the "\n\n" stop
        # string) already ends with that blank line, anything else needs one before the next turn
        self.state = seq.final_state
        self.fresh = False
        separator = self.format.separator.encode()
        self.needs_separator = not (seq.finish_reason == "stop" and seq.tokens
                                    and self.engine.tokenizer.decode_bytes(seq.tokens).endswith(separator))
        return shown.answer

    def prompt(self, message: str) -> list[int]:
        """The tokens of one user turn and the reply prompt, rendered as the server and chat training data
        render them (`aviary.chat_format`, segment by segment), after the system prompt on a fresh start."""
        messages = [ChatMessage("system", self.system)] if self.fresh and self.system.strip() else []
        segments = self.format.segments([*messages, ChatMessage("user", message)], effort=self.effort)
        texts = [text for text, _ in segments]
        if self.needs_separator:  # the last reply did not end with its blank line
            texts.insert(0, self.format.separator)
        return [t for text in texts for t in self.engine.tokenizer.encode(text)]

    def set(self, assignment: str) -> None:
        """`name=value` -> a new SamplingParams (validated; the old one stays on error)."""
        params = parse_setting(assignment, self.params)
        params.check_vocab(self.engine.vocab_size)  # ids the model has: caught now, not at the next message
        self.params = params


class _Shown:
    """Writes a streamed reply: the reasoning dimmed (or between <think> and </think> when not a terminal),
    then the answer, each after the space that follows "Assistant:"."""

    def __init__(self, out, splitter, color: bool):
        self.out, self.splitter, self.color = out, splitter, color
        self.part, self.answer = None, ""

    def write(self, piece: str, final: bool = False) -> None:
        reasoning, answer = self.splitter.feed(piece)
        if final:
            more = self.splitter.finish()
            reasoning, answer = reasoning + more[0], answer + more[1]
        if reasoning:
            if self.part is None:
                self.out.write(" " + (DIM if self.color else "<think> "))
                self.part = "reasoning"
            self.out.write(reasoning)
        if answer:
            if self.part == "reasoning":
                self.close()
                self.out.write("\n")
            if self.part is None:
                self.out.write(" ")
            self.part = "answer"
            self.out.write(answer)
            self.answer += answer
        self.out.flush()

    def close(self) -> None:
        """End the dimmed reasoning, if it is open."""
        if self.part == "reasoning":
            self.out.write(RESET if self.color else " </think>")
            self.part = "closed"


def run(args: argparse.Namespace) -> int:
    from aviary.generation import Engine
    from aviary.state import RWKVState

    chat_format = format_for(args.chat_format, resolve_model_path(args.model))
    model, tokenizer, state = load_model(args, args.model)
    interactive = sys.stdin.isatty()
    chat = Chat(Engine(model, tokenizer), sampling_params(args), state, args.user, args.assistant,
                chat_format=chat_format, system=args.system, effort=args.reasoning_effort,
                color=interactive and sys.stdout.isatty())
    # the separator and the next turn's role label end the reply
    chat.params = dataclasses.replace(chat.params, stop=(*chat.format.stop, *chat.params.stop))
    user, assistant = chat.format.labels["User"], chat.format.labels["Assistant"]
    if interactive:
        print(f"RWKV-{model.config.version} chat, {chat.format.name} format. /help for commands, /quit to leave.")
    while True:
        try:
            line = input(f"{user}: " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if command in ("/quit", "/exit"):
                    return 0
                elif command == "/reset":
                    chat.reset()
                    print("(conversation reset)")
                elif command in ("/save", "/load") and not rest:
                    raise ValueError(f"use {command} FILE")
                elif command == "/save":
                    (chat.state or model.init_state(1)).save(rest)
                    print(f"(state saved to {rest})")
                elif command == "/load":
                    loaded = RWKVState.load(rest, device=args.device)
                    model.check_state(loaded, 1)
                    chat.state, chat.needs_separator, chat.fresh = loaded, False, False
                    print(f"(state loaded from {rest})")
                elif command == "/set":
                    chat.set(rest)
                    print(f"({chat.params})")
                elif command == "/settings":
                    print(chat.params)
                elif command == "/help":
                    print(__doc__.split("lines that start with / are commands:")[1].split("examples:")[0].strip())
                else:
                    raise ValueError(f"unknown command {command}; /help lists them")
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
            except Exception:  # a bug: reported in full, and the conversation goes on
                traceback.print_exc()
                print(f"error: {command} failed (the traceback above is a bug; please report it)", file=sys.stderr)
            continue
        print(f"{assistant}:", end="", flush=True)
        # Whatever goes wrong in one reply, the conversation (its state) survives: the turn either completes
        # or leaves chat.state as it was, and the user can go on, /save it, or /quit.
        try:
            chat.turn(line)
        except KeyboardInterrupt:
            print("(reply interrupted; the conversation continues from before your message)", file=sys.stderr)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
        except Exception:  # a bug, reported in full, but not at the price of the conversation
            traceback.print_exc()
            print("error: the reply failed (the traceback above is a bug; please report it); the conversation "
                  "continues from before your message, /save keeps it", file=sys.stderr)
