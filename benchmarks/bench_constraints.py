"""The cost of constrained decoding (aviary.generation.constraints, llguidance) for the World vocabulary.

    python benchmarks/bench_constraints.py                     # prints a table
    python benchmarks/bench_constraints.py --out benchmarks/results/constraints.json

Measures: building the grammar compiler for the tokenizer (once per server), compiling a JSON schema (once
per request), and per generated token the mask (`Constraint.mask`: llguidance's bitmask, unpacked, applied to
[V] logits) and `advance`, over replies sampled from random logits under a schema; then one decode step of
a tiny random RWKV-7 (2 layers, C=64) for a batch of 8 rows, unconstrained and constrained (inside a JSON
string), where the masks are a large part of the step (a real model's step is longer, the masks cost the
same). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import backend_info  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "n": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                    "maxItems": 4}},
          "required": ["name", "n", "tags"], "additionalProperties": False}


def per_token(grammar, vocab_size: int, replies: int) -> tuple[list[float], list[float]]:
    masks, advances = [], []
    for seed in range(replies):
        gen, c = torch.Generator().manual_seed(seed), grammar.start()
        while not c.done:
            logits = torch.randn(vocab_size, generator=gen)
            t0 = time.perf_counter()
            c.mask(logits)
            masks.append(time.perf_counter() - t0)
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if token == 0:
                break
            t0 = time.perf_counter()
            c.advance(token)
            advances.append(time.perf_counter() - t0)
    return masks, advances


def step_times(model, tok, grammar, rows: int, steps: int) -> tuple[float, float]:
    """Median decode step of `rows` unconstrained rows and of `rows` constrained ones, the two engines' steps
    interleaved so that a busy machine slows both alike."""
    from aviary.generation import Engine, SamplingParams

    engines = [Engine(model, tok), Engine(model, tok)]
    for k, engine in enumerate(engines):
        for i in range(rows):
            engine.add("User: hi\n\nAssistant:", SamplingParams(seed=i, max_new_tokens=steps + 2),
                       constraint=grammar.start() if k else None)
        engine.step()  # joins the batch
    times = [[], []]
    for _ in range(steps):
        for k, engine in enumerate(engines):
            t0 = time.perf_counter()
            engine.step()
            times[k].append(time.perf_counter() - t0)
    assert all(engine.batch_size == rows for engine in engines)  # no row finished early
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replies", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import aviary
    from aviary.generation.constraints import Grammars
    from aviary.testing import random_config, save_random_checkpoint
    from aviary.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    t0 = time.perf_counter()
    grammars = Grammars(tok, tok.vocab_size)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = grammars.json(SCHEMA)
    compile_s = time.perf_counter() - t0
    masks, advances = per_token(grammar, tok.vocab_size, args.replies)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tiny.safetensors"
        save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=65536), seed=5)
        model = aviary.load(path)
    # inside a long JSON string: the commonest state, and no row finishes during the measurement
    free, constrained = step_times(model, tok, grammars.json({"type": "string", "minLength": 1000}), 8, 30)
    result = {"grammars_build_ms": build * 1e3, "schema_compile_ms": compile_s * 1e3, "tokens": len(masks),
              "mask_median_us": statistics.median(masks) * 1e6,
              "mask_p90_us": sorted(masks)[int(0.9 * len(masks))] * 1e6,
              "advance_median_us": statistics.median(advances) * 1e6,
              "step_8_rows_ms": {"unconstrained": free * 1e3, "constrained": constrained * 1e3},
              "backend": backend_info()}
    print(f"{'grammar compiler for World (once)':40s} {result['grammars_build_ms']:8.0f} ms")
    print(f"{'JSON schema compile (per request)':40s} {result['schema_compile_ms']:8.1f} ms")
    print(f"{'mask per token, median / p90':40s} {result['mask_median_us']:8.0f} / {result['mask_p90_us']:.0f} us"
          f"  ({len(masks)} tokens)")
    print(f"{'advance per token, median':40s} {result['advance_median_us']:8.0f} us")
    print(f"{'tiny model step, 8 rows: free / constrained':40s} {free * 1e3:8.2f} / {constrained * 1e3:.2f} ms")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
