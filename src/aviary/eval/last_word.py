"""LAMBADA: predict the last word of a passage (`aviary eval lambada`).

A passage is a JSON Lines record, either `{"text": ...}` (the LAMBADA test set as OpenAI detokenised it,
`lambada_openai`: the target is the last word, everything after the last space) or `{"context": ...,
"target": ...}` (the project's `lambada_austen.jsonl`). The target is scored as the continuation
`" " + word` of the context. Per passage: its log-likelihood (summed over the target's tokens) and whether
every target token was the model's argmax. Reported: accuracy = fraction of passages predicted greedily,
perplexity = exp(-mean log-likelihood per passage), the numbers lm-evaluation-harness calls `acc` and
`perplexity`.

Two protocols, which differ in tokenisation and in the first token:

    harness   lm-evaluation-harness's `lambada_openai` task: context = the words before the last one joined by
              spaces, continuation = " " + last word; trailing spaces of the context move to the continuation,
              `context + continuation` is encoded once and split after the context's own tokens
              (TemplateLM._encode_pair); nothing is put before the context.
    rwkv-lm   RWKV-LM's LAMBADA loop (RWKV-v7/rwkv_v7_demo.py): the same split (rsplit at the last space),
              but the context is `[0] + encode(context)` (end-of-text first) and the target is encoded on its
              own, `encode(" " + word)`.

The numbers of the two differ a little (the first token of a passage is predicted from token 0 or not at
all; a word boundary can tokenise differently). The papers' tables come from lm-evaluation-harness.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from aviary.eval.scoring import continuation_scores
from aviary.textio import DataError, read_documents

__all__ = ["PROTOCOLS", "LambadaResult", "lambada", "read_passages", "split_passage"]

PROTOCOLS = ("harness", "rwkv-lm")


@dataclass(frozen=True)
class LambadaResult:
    file: str
    protocol: str
    passages: int
    correct: int
    nll: float  # summed over passages, nats

    @property
    def accuracy(self) -> float:
        return self.correct / self.passages

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.passages)

    def to_dict(self) -> dict:
        return {"file": self.file, "protocol": self.protocol, "passages": self.passages, "correct": self.correct,
                "accuracy": self.accuracy, "perplexity": self.perplexity, "nll": self.nll}


def split_passage(text: str) -> tuple[str, str]:
    """lambada_openai's split: (the words before the last one, " " + the last word)."""
    context, sep, word = text.rpartition(" ")
    if not sep or not context or not word:
        raise ValueError("a passage needs a context and a last word separated by a space")
    return context, " " + word


def read_passages(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " " + target) of the passages of a JSON Lines file in either format (see the module
    docstring); `limit` keeps the first ones. Raises DataError naming the file and line."""
    passages = []
    for lineno, line in enumerate(read_documents(path, "lines"), 1):
        if limit is not None and len(passages) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"not JSON ({e.msg} at column {e.colno})", lineno) from None
        if isinstance(obj, dict) and isinstance(obj.get("context"), str) and isinstance(obj.get("target"), str):
            passages.append((obj["context"], " " + obj["target"].lstrip(" ")))
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            try:
                passages.append(split_passage(obj["text"]))
            except ValueError as e:
                raise DataError(path, str(e), lineno) from None
        else:
            raise DataError(path, 'not a passage: {"text": ...} or {"context": ..., "target": ...}', lineno)
    if not passages:
        raise DataError(path, "no passages in it")
    return passages


def encode_passage(tokenizer, context: str, continuation: str, protocol: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one passage under `protocol`."""
    if protocol == "harness":
        stripped = context.rstrip()  # TemplateLM._encode_pair moves the context's trailing spaces to the target
        context, continuation = stripped, context[len(stripped):] + continuation
        ctx = tokenizer.encode(context)
        whole = tokenizer.encode(context + continuation)
        return ctx, whole[len(ctx):]
    if protocol == "rwkv-lm":
        return [tokenizer.eot_id, *tokenizer.encode(context)], tokenizer.encode(continuation)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def lambada(model, tokenizer, path: str | os.PathLike, *, protocol: str = "harness", limit: int | None = None,
            progress: bool = False) -> LambadaResult:
    """Accuracy and target perplexity on a LAMBADA file (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    pairs = [encode_passage(tokenizer, c, t, protocol) for c, t in read_passages(path, limit)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc=os.path.basename(str(path)), unit="passage", leave=False)
    correct, nll = 0, 0.0
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("a passage tokenised to an empty context or target")
        ll, greedy = continuation_scores(model, ctx, [cont])[0]
        correct += greedy
        nll -= ll
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return LambadaResult(str(path), protocol, len(pairs), correct, nll)
