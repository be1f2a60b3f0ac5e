"""Perplexity and bits per byte of text files (`aviary eval ppl`).

Every document is scored on its own: `[0] + tokens(document)`, the end-of-text token 0 in front so that every
token of the document is predicted (lm-evaluation-harness's rolling log-likelihood conditions on its
`prefix_token_id` the same way). Two ways through a document:

    window=None   the whole document in one pass through the state (the recurrent model's natural use; memory
                  does not grow with the length, aviary.eval.scoring)
    window=N      disjoint windows of N predicted tokens, each from a fresh state with the one token before it
                  as context: what lm-evaluation-harness's `loglikelihood_rolling` does for a model whose
                  maximum length is N, so the number compares with a Transformer of context N. A window at
                  least as long as the document gives the same number as window=None.

perplexity = exp(total nll / tokens); bits per byte = total nll / ln 2 / UTF-8 bytes of the documents (it does
not depend on the tokenizer, so it compares models with different vocabularies).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from aviary.textio import read_documents

__all__ = ["PerplexityResult", "document_nll", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """Totals over one file (or all files, `name` "total")."""

    name: str
    documents: int
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of the documents
    nll: float  # summed negative log-likelihood, nats

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def document_nll(model, ids: Sequence[int], *, window: int | None = None, state=None, chunk_len: int = 1024,
                 progress: Callable[[int], object] | None = None) -> float:
    """Summed nll (nats) of `ids[1:]` given the tokens before each: through the state in one pass, or with
    `window`, in disjoint windows of `window` predicted tokens, each from `state` (or the initial state) with
    only the one token before the window as context."""
    from aviary.eval.scoring import token_losses

    if len(ids) < 2:
        return 0.0
    if window is None:
        return token_losses(model, ids, state=state, chunk_len=chunk_len, progress=progress).total
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")
    total = 0.0
    for start in range(1, len(ids), window):  # predicts ids[start : start + window]
        total += token_losses(model, ids[start - 1:start + window], state=state, chunk_len=chunk_len,
                              progress=progress).total
    return total


def _documents(path: str | os.PathLike, input: str, field: str) -> Iterable[str]:
    return (doc for doc in read_documents(path, input, field) if doc)


def perplexity(model, tokenizer, files: Sequence[str | os.PathLike], *, window: int | None = None,
               input: str = "auto", field: str = "text", state=None, max_documents: int | None = None,
               chunk_len: int = 1024, progress: bool = False) -> list[PerplexityResult]:
    """Perplexity and bits per byte of each file (documents as aviary.textio reads them, empty ones skipped)
    and, with more than one file, of all together (a last result named "total"). `max_documents` keeps the
    first documents of each file; `progress` shows a tqdm bar of tokens on stderr."""
    results = []
    for path in files:
        docs = list(_documents(path, input, field))[:max_documents]
        if not docs:
            raise ValueError(f"{path}: no text in it")
        ids = [[tokenizer.eot_id, *tokenizer.encode(doc)] for doc in docs]
        bar = _bar(sum(map(len, ids)), str(path)) if progress else None
        nll = 0.0
        for doc_ids in ids:
            nll += document_nll(model, doc_ids, window=window, state=state, chunk_len=chunk_len,
                                progress=bar.update if bar else None)
        if bar is not None:
            bar.close()
        results.append(PerplexityResult(str(path), len(docs), sum(len(i) - 1 for i in ids),
                                        sum(len(d.encode("utf-8")) for d in docs), nll))
    if len(results) > 1:
        results.append(PerplexityResult("total", *(sum(getattr(r, k) for r in results)
                                                   for k in ("documents", "tokens", "bytes", "nll"))))
    return results


def _bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=os.path.basename(name), unit="tok", unit_scale=True, leave=False)
