"""Sampling settings: `SamplingParams`, and how each setting is offered to a user.

Each setting is a field of `SamplingParams` whose metadata gives its help text, its command-line flags
(`aviary generate`, `aviary chat`) and whether an OpenAI request sets it (`aviary serve`, the request
field of the same name). `SETTINGS` describes them all; the CLI options, chat's `/set NAME=VALUE` and the
server's request mapping are made from it, and `SamplingParams.validate` checks every value, whichever way
it came in. A new setting is one field here, plus its pydantic field in `aviary.serve.protocol` (which
carries OpenAI's ranges; a test checks that the two agree).

Defaults, one decision for the whole package:
- `SamplingParams()`: plain sampling (temperature 1, no truncation, no penalties). That is what the
  OpenAI API means by a field left out, so `aviary serve` uses it, as does the library.
- `SamplingParams.reference()`: the reference `rwkv` package's PIPELINE_ARGS (top_p 0.85, presence and
  frequency penalties 0.2, decay 0.996), what RWKV users get from ChatRWKV. `aviary generate` and `aviary
  chat` use it. A client of the server gets it by sending those four values.

No torch here: the command line builds its options from this module for `--help`.
"""

from __future__ import annotations

import math
import random
import typing
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["SETTINGS", "SamplingParams", "Setting"]


def _setting(default: Any, help: str, *flags: str, api: bool = False) -> Any:
    """A field of SamplingParams with what a user sees of it: `help`, its command-line `flags` (none: not
    an option), and `api`: an OpenAI request's field of the same name sets it."""
    return field(default=default, metadata={"help": help, "flags": flags, "api": api})


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are plain sampling (no truncation, no penalties).

    Use `SamplingParams.reference()` for the reference pipeline's defaults (top_p 0.85, penalties 0.2,
    decay 0.996), `SamplingParams(temperature=0)` for greedy decoding.
    """

    # max_new_tokens and stop reach the server through its own mapping (its --max-tokens limit, OpenAI's
    # max_completion_tokens, the chat format's stop string), so they have no api=True
    max_new_tokens: int = _setting(256, "tokens to generate", "-n", "--max-tokens")
    temperature: float = _setting(1.0, "0 = greedy", "--temperature", api=True)
    top_p: float = _setting(1.0, "nucleus mass to keep", "--top-p", api=True)
    top_k: int = _setting(0, "keep the k most likely tokens, 0 = off", "--top-k", api=True)
    min_p: float = _setting(0.0, "drop tokens below min_p * max prob, 0 = off", "--min-p", api=True)
    presence_penalty: float = _setting(0.0, "subtracted from the logit of every token generated so far",
                                       "--presence-penalty", api=True)
    frequency_penalty: float = _setting(0.0, "subtracted from a token's logit, times its (decayed) count",
                                        "--frequency-penalty", api=True)
    penalty_decay: float = _setting(1.0, "per-token decay of the counts", "--penalty-decay", api=True)
    banned_tokens: tuple[int, ...] = _setting((), "never emit this token id", "--ban")
    stop: tuple[str, ...] = _setting((), "stop before this text; escapes like \\n are understood", "--stop")
    stop_token_ids: tuple[int, ...] = _setting((0,), "token ids that end the text (0: the World tokenizer's "
                                                     "end of document)")
    seed: int | None = _setting(None, "make sampling reproducible", "--seed", api=True)  # None: fresh per sequence

    def __post_init__(self) -> None:
        # tuples so a params object can be shared and hashed; accept lists and single strings from callers
        for name in ("banned_tokens", "stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    @classmethod
    def reference(cls, **overrides) -> SamplingParams:
        """The defaults of the reference package's PIPELINE_ARGS."""
        base = dict(temperature=1.0, top_p=0.85, top_k=0, presence_penalty=0.2, frequency_penalty=0.2,
                    penalty_decay=0.996)
        return cls(**{**base, **overrides})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"invalid sampling setting {name}={getattr(self, name)!r}: {why}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            bad("max_new_tokens", "must be an integer >= 0")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "penalty_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 means off)")
        if not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if not 0 <= self.penalty_decay <= 1:
            bad("penalty_decay", "must be in [0, 1]")
        for name in ("banned_tokens", "stop_token_ids"):
            for t in getattr(self, name):
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    bad(name, f"{t!r} is not a token id")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", "stop strings must be non-empty strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer")

    def check_vocab(self, vocab_size: int) -> None:
        for name in ("banned_tokens", "stop_token_ids"):
            for t in getattr(self, name):
                if t >= vocab_size:
                    raise ValueError(f"invalid sampling setting {name}: token id {t} is outside the "
                                     f"vocabulary [0, {vocab_size})")

    def make_generator(self, offset: int = 0) -> torch.Generator:
        """The random stream for one sequence: `seed + offset`, or a fresh seed."""
        import torch

        seed = random.SystemRandom().randrange(2**63) if self.seed is None else self.seed + offset
        return torch.Generator().manual_seed(seed % 2**64)


@dataclass(frozen=True)
class Setting:
    """One field of SamplingParams as a user sees it."""

    name: str  # the SamplingParams field
    kind: type  # int, float or str: the value's type, or each item's when `many`
    many: bool  # a tuple of values
    optional: bool  # None is a value too
    help: str
    flags: tuple[str, ...]  # the command-line option's names; () when it is not an option
    api: bool  # set by the OpenAI request field of the same name


def _describe() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(SamplingParams)
    out = []
    for f in fields(SamplingParams):
        hint, args = hints[f.name], typing.get_args(hints[f.name])
        many, optional = typing.get_origin(hint) is tuple, type(None) in args
        out.append(Setting(f.name, args[0] if many or optional else hint, many, optional, f.metadata["help"],
                           f.metadata["flags"], f.metadata["api"]))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _describe()  # in field order
