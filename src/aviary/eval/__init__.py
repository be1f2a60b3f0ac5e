"""Evaluation: perplexity, LAMBADA, loss by token position, and what a dtype or quantisation costs, for any
model Aviary loads (`aviary eval ...` on the command line; docs/evaluation.md).

    >>> import aviary, aviary.eval
    >>> model, tok = aviary.load(path), aviary.load_tokenizer("world")               # doctest: +SKIP
    >>> aviary.eval.perplexity(model, tok, ["valid.jsonl.xz"])                       # doctest: +SKIP
    >>> aviary.eval.lambada(model, tok, "lambada_openai.jsonl.xz", limit=200)        # doctest: +SKIP

Everything scores tokens through `aviary.eval.scoring` (`token_losses`, `continuation_scores`), which the
lm-evaluation-harness adapter uses too. Names are imported on first use, so `import aviary.eval` imports no
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "TokenScores": "aviary.eval.scoring",
    "token_losses": "aviary.eval.scoring",
    "continuation_scores": "aviary.eval.scoring",
    "perplexity": "aviary.eval.ppl",
    "lambada": "aviary.eval.last_word",
    "loss_by_position": "aviary.eval.positions",
    "compare": "aviary.eval.precision",
}

__all__ = ["TokenScores", "compare", "continuation_scores", "lambada", "loss_by_position", "perplexity",
           "token_losses"]

if TYPE_CHECKING:
    from aviary.eval.last_word import lambada
    from aviary.eval.positions import loss_by_position
    from aviary.eval.ppl import perplexity
    from aviary.eval.precision import compare
    from aviary.eval.scoring import TokenScores, continuation_scores, token_losses


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule: aviary.eval.harness, aviary.eval.scoring, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
