"""Talk to an RWKV model, turn by turn, in the RWKV World chat format:

    User: <your message>

    Assistant: <the reply>

The whole conversation lives in the recurrent state (a few MB however long it gets), so each turn only
runs the new message. Type a message and press Enter; lines that start with / are commands:

  /reset              forget the conversation (back to the starting state)
  /save FILE          write the conversation's state to FILE (safetensors)
  /load FILE          continue from a state saved with /save
  /set NAME=VALUE     change a sampling setting, e.g. /set temperature=0.7 or /set max_new_tokens=300
  /settings           show the sampling settings
  /help               this list
  /quit               leave (Ctrl-D works too)

examples:
  aviary chat
  aviary chat RWKV-x070-World-1.5B.pth --temperature 1.0 --top-p 0.3
  aviary chat model.pth --state my-conversation.state
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

from aviary.chat_format import ChatMessage, prompt_segments
from aviary.commands._common import (
    add_model_arguments,
    add_sampling_arguments,
    load_model,
    parse_setting,
    sampling_params,
)

HELP = "interactive multi-turn chat, with the conversation's state saved and loaded on request"
PROMPT = "User: "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint (default: the bundled model)")
    parser.add_argument("--user", default="User", help="the name of your turns (default: User)")
    parser.add_argument("--assistant", default="Assistant", help="the name of the model's turns (default: Assistant)")
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_tokens=500)


class Chat:
    """The conversation: a state, plus whether the last reply ended cleanly with a blank line."""

    def __init__(self, engine, params, start_state, user: str = "User", assistant: str = "Assistant"):
        self.engine, self.params = engine, params
        self.start_state = start_state
        self.user, self.assistant = user, assistant
        self.reset()

    def reset(self) -> None:
        self.state = self.start_state
        self.needs_separator = False

    def turn(self, message: str, out=None) -> str:
        """Send one user message, stream the reply to `out` (stdout), and keep the state for the next turn."""
        out = out or sys.stdout
        seq = self.engine.add(self.prompt(message), self.params, state=self.state)
        try:
            while self.engine.has_work:
                for _, piece in self.engine.step():
                    out.write(piece)
                    out.flush()
        except BaseException:  # Ctrl-C or an error mid-reply: drop the reply, keep the state from before it
            self.engine.cancel(seq)
            out.write("\n")
            raise
        out.write("\n")
        # the state after every token that was fed back; a reply cut by the "\n\n" stop string already
        # ends with that blank line, anything else needs one before the next turn
        self.state = seq.final_state
        self.needs_separator = not (seq.finish_reason == "stop" and seq.tokens
                                    and self.engine.tokenizer.decode_bytes(seq.tokens).endswith(b"\n\n"))
        return seq.text

    def prompt(self, message: str) -> list[int]:
        """The tokens of one user turn and the reply's "Assistant:", rendered as the server and chat training
        data render them (`aviary.chat_format`, segment by segment); --user/--assistant rename the two."""
        user, reply = prompt_segments([ChatMessage("user", message)])  # "User: message\n\n", "Assistant:"
        segments = [self.user + user.removeprefix("User"), self.assistant + reply.removeprefix("Assistant")]
        if self.needs_separator:  # the last reply did not end with its blank line
            segments.insert(0, "\n\n")
        return [t for segment in segments for t in self.engine.tokenizer.encode(segment)]

    def set(self, assignment: str) -> None:
        """`name=value` -> a new SamplingParams (validated; the old one stays on error)."""
        params = parse_setting(assignment, self.params)
        params.check_vocab(self.engine.vocab_size)  # ids the model has: caught now, not at the next message
        self.params = params


def run(args: argparse.Namespace) -> int:
    from aviary.generation import Engine
    from aviary.state import RWKVState

    model, tokenizer, state = load_model(args, args.model)
    params = sampling_params(args)
    params = dataclasses.replace(params, stop=("\n\n", *params.stop))  # a blank line ends the reply
    chat = Chat(Engine(model, tokenizer), params, state, args.user, args.assistant)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"RWKV-{model.config.version} chat. /help for commands, /quit to leave.")
    while True:
        try:
            line = input(f"{args.user}: " if interactive else "")
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
                    chat.state, chat.needs_separator = loaded, False
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
        print(f"{args.assistant}:", end="", flush=True)
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
