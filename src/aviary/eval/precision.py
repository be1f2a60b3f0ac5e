"""What a precision or a quantisation costs (`aviary eval compare`): a model loaded as fp32 (the reference)
and as bf16, fp16 or int8 reads the same held-out tokens; reported per variant are the loss and its change,
the KL divergence KL(reference || variant) per position (mean and max), top-1 agreement of the argmax, and the
logit error. The measurement is the one `benchmarks/bench_precision.py` makes (it imports `compare_logits`).

The text: the first `segment` tokens of evenly spaced documents, each segment from a fresh state, until
`tokens` positions; every variant sees the same segments, through the parallel form in chunks (the prefill
path), one variant loaded at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

__all__ = ["VARIANTS", "compare", "compare_logits", "prefill_logits", "segment_targets", "token_segments"]

# name -> (dtype, quantize) for aviary.load
VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "fp16": ("float16", None),
            "int8": ("float32", "int8"), "bf16-int8": ("bfloat16", "int8")}


def compare_logits(x: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    """x and ref: logits [T, V]; targets [T] (-1 where there is no next token). KL(ref || x) in nats; the
    log-softmaxes in float64, 256 rows at a time (a KL of 1e-7 is below float32's rounding of the terms)."""
    kl, nll_x, nll_ref = [], [], []
    for i in range(0, x.shape[0], 256):
        lx, lr = torch.log_softmax(x[i:i + 256].double(), -1), torch.log_softmax(ref[i:i + 256].double(), -1)
        kl.append((lr.exp() * (lr - lx)).sum(-1))
        t = targets[i:i + 256]
        has = t >= 0
        nll_x.append(-lx[has].gather(-1, t[has, None])[:, 0])
        nll_ref.append(-lr[has].gather(-1, t[has, None])[:, 0])
    kl_all = torch.cat(kl)
    d = x - ref
    return {"positions": int(x.shape[0]), "max_abs": float(d.abs().max()),
            "rel_rms": float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
            "top1_agree": float((x.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl_mean": float(kl_all.mean()), "kl_max": float(kl_all.max()),
            "loss": float(torch.cat(nll_x).mean()), "loss_ref": float(torch.cat(nll_ref).mean())}


def token_segments(docs: Sequence[str], tokenizer, n_tokens: int, segment: int) -> list[list[int]]:
    """The first `segment` tokens of evenly spaced documents (all of a shorter one) until n_tokens in all.
    ValueError if the documents hold fewer."""
    want = -(-n_tokens // segment)
    step = max(1, len(docs) // want)
    segments, total = [], 0
    for doc in list(docs[::step]) + list(docs):  # evenly spaced first; the rest if those run short
        if total >= n_tokens:
            break
        ids = tokenizer.encode(doc)[:min(segment, n_tokens - total)]
        if len(ids) >= 2:
            segments.append(ids)
            total += len(ids)
    if total < n_tokens:
        raise ValueError(f"the text holds only {total} tokens in segments of at least 2; ask for fewer tokens")
    return segments


def segment_targets(segments: Sequence[Sequence[int]]) -> torch.Tensor:
    """The next token of every position of the concatenated segments; -1 at each segment's last position."""
    return torch.tensor([t for ids in segments for t in [*ids[1:], -1]])


def prefill_logits(model, segments: Sequence[Sequence[int]], chunk: int = 256) -> torch.Tensor:
    """Logits [sum T, V] float32 of every segment, each from a fresh state, `chunk` tokens per call."""
    out = []
    with torch.inference_mode():
        for ids in segments:
            state = None
            for i in range(0, len(ids), chunk):
                logits, state = model(torch.tensor([list(ids[i:i + chunk])], device=model.device), state)
                out.append(logits[0].float().cpu())
    return torch.cat(out)


def compare(path: str | os.PathLike, docs: Sequence[str], *, tokenizer=None, against: str = "fp32",
            variants: Sequence[str] = ("bf16", "int8"), tokens: int = 2048, segment: int = 256,
            device: str = "cpu", adapter=None) -> dict:
    """Load the checkpoint at `path` as `against` and as each of `variants` (names of VARIANTS), run the same
    held-out segments of `docs` through each and compare every variant's logits with the reference's:
    {"reference": ..., "positions", "segments", "loss_ref", "variants": {name: compare_logits(...)}}.
    `tokenizer`: a tokenizer, a name or file for `aviary.load_tokenizer`, or None (the model version's)."""
    import aviary

    for name in (against, *variants):
        if name not in VARIANTS:
            raise ValueError(f"unknown precision {name!r}; choose from {', '.join(VARIANTS)}")
    if tokens < 2 or segment < 2:
        raise ValueError("tokens and segment must be at least 2")

    def load(name: str):
        dtype, quantize = VARIANTS[name]
        return aviary.load(str(path), device=device, dtype=dtype, quantize=quantize, adapter=adapter)

    model = load(against)
    if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
        tokenizer = aviary.load_tokenizer(tokenizer, version=model.config.version)
    segments = token_segments(docs, tokenizer, tokens, segment)
    targets = segment_targets(segments)
    ref = prefill_logits(model, segments)
    del model
    result = {"reference": against, "positions": int(targets.numel()), "segments": len(segments), "variants": {}}
    for name in variants:
        result["variants"][name] = compare_logits(prefill_logits(load(name), segments), ref, targets)
    ref_loss = compare_logits(ref, ref, targets)["loss"]
    result["loss_ref"] = ref_loss
    return result
