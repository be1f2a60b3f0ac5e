"""Sampling cost of one decode step: `sample_batch` over a batch of 65,536-token logit rows, with the truncations
of `aviary.generation.sampling` (top-p and top-k through the top candidates) against the same step with the
full-sort reference (`truncate_reference`) in the same run, as a ratio.

Logits are random normal times a scale: 3 gives flat rows (a nucleus of thousands of tokens, the worst case
for the candidates), 10 peaked ones, as trained models mostly give.

    python benchmarks/bench_sampling.py                       # one thread, batch 64
    python benchmarks/bench_sampling.py --batch 8 --json sampling.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from aviary.generation import sampling
from aviary.generation.params import SamplingParams

SETTINGS = [dict(top_p=1.0), dict(top_p=0.3), dict(top_p=0.85), dict(top_k=50), dict(top_p=0.85, top_k=40)]


def cpu_seconds(logits: torch.Tensor, ps: list[SamplingParams], repeats: int) -> float:
    gens = [torch.Generator().manual_seed(i) for i in range(len(ps))]
    sampling.sample_batch(logits, ps, gens)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        sampling.sample_batch(logits, ps, gens)
        best = min(best, time.process_time() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="rows per step (default 64)")
    ap.add_argument("--vocab", type=int, default=65536, help="logits per row (default 65536, the World vocabulary)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (default 5)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if min(args.batch, args.vocab, args.threads, args.repeats) < 1:
        ap.error("--batch, --vocab, --threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"sample_batch CPU seconds per step, batch {args.batch}, vocabulary {args.vocab}, {args.threads} thread(s)")
    print(f"{'settings':28s} {'scale':>5s} {'candidates':>10s} {'full sort':>9s} {'speed-up':>8s}")
    for scale in (3.0, 10.0):
        logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0)) * scale
        for kw in SETTINGS:
            ps = [SamplingParams(**kw) for _ in range(args.batch)]
            fast = cpu_seconds(logits, ps, args.repeats)
            original = sampling._truncate_top
            sampling._truncate_top = sampling.truncate_reference
            try:
                full = cpu_seconds(logits, ps, args.repeats)
            finally:
                sampling._truncate_top = original
            rows.append({"settings": kw, "scale": scale, "candidates_s": fast, "full_sort_s": full})
            label = ", ".join(f"{k}={v}" for k, v in kw.items())
            print(f"{label:28s} {scale:5.0f} {fast:10.4f} {full:9.4f} {full / fast:7.1f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "vocab": args.vocab, "threads": args.threads,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
