"""Chunk length of the chunked time-mix ops: forward+backward process CPU time of `gla_chunked` (RWKV-5's
constant decay and RWKV-6's data-dependent one) and `delta_rule_chunked` (RWKV-7) at several chunk lengths, on
shapes of training (a batch of short rows, a few rows of 512, one long row) and of the MQAR experiment.

The chunk length trades the pair tensors inside a chunk ([B, H, n, L, L, K]: elementwise work and memory that
grow with L) against the sequential state carry between chunks (T / L small matmuls). It sets the ops'
defaults; each row is a ratio to the default in the same run, so a busy machine changes little.

    python benchmarks/bench_chunk_len.py                       # one thread, the default shapes
    python benchmarks/bench_chunk_len.py --lens 4,8,16,32 --json chunk_len.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

from aviary.cpu.malloc import keep_freed_memory
from aviary.ops.delta import delta_rule_chunked
from aviary.ops.gla import gla_chunked

SHAPES = [(64, 128, 1, 64), (4, 512, 8, 64), (1, 2048, 8, 64)]  # (B, T, H, K): MQAR, training rows, a long row


def inputs(op: str, B: int, T: int, H: int, K: int, seed: int = 0) -> tuple:
    """Random inputs of the ranges the models feed each op, with gradients."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, K)
    state = torch.zeros(B, H, K, K, requires_grad=True)
    if op == "rwkv7":
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
        iclr = torch.rand(B, T, H, K, generator=g)
        logw = (-0.6065 * torch.sigmoid(torch.randn(B, T, H, K, generator=g))).requires_grad_()
        return r, logw, k, v, (-kk).requires_grad_(), (kk * iclr).requires_grad_(), state
    const = op == "rwkv5"
    logw = (-torch.exp(torch.randn(1 if const else B, 1 if const else T, H, K, generator=g) * 0.5 - 1)).requires_grad_()
    return r, k, v, logw, rnd(H, K), state


def cpu_seconds(fn, args, chunk_len: int, repeats: int) -> float:
    """Best process CPU time of forward + backward (of the outputs' and the final state's sums)."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        for a in args:
            a.grad = None
        t = time.process_time()
        y, s = fn(*args, chunk_len=chunk_len)
        (y.sum() + s.sum()).backward()
        best = min(best, time.process_time() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="4,8,16,32", help="chunk lengths, comma-separated (default 4,8,16,32)")
    ap.add_argument("--ops", default="rwkv5,rwkv6,rwkv7", help="which ops (default all three)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per point, best kept (default 2)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    lens = [int(s) for s in args.lens.split(",") if s]
    ops = [s for s in args.ops.split(",") if s]
    if not lens or min(lens) < 1:
        ap.error("--lens: positive integers, e.g. 4,8,16")
    if not ops or set(ops) - {"rwkv5", "rwkv6", "rwkv7"}:
        ap.error("--ops: from rwkv5, rwkv6, rwkv7")
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    funcs = {"rwkv5": gla_chunked, "rwkv6": gla_chunked, "rwkv7": delta_rule_chunked}
    rows = []
    print(f"fwd+bwd CPU seconds, {args.threads} thread(s); ratio = time / time at the op's default chunk length")
    print(f"{'op':6s} {'B':>3s} {'T':>5s} {'H':>2s} {'K':>3s} {'default':>7s}  " +
          "  ".join(f"{'L' + str(L):>13s}" for L in lens))
    for op in ops:
        fn = funcs[op]
        default = inspect.signature(fn).parameters["chunk_len"].default
        for B, T, H, K in SHAPES:
            args_ = inputs(op, B, T, H, K)
            times = {L: cpu_seconds(fn, args_, L, args.repeats) for L in sorted(set(lens) | {default})}
            rows.append({"op": op, "B": B, "T": T, "H": H, "K": K, "default": default,
                         "cpu_seconds": {str(L): t for L, t in times.items()}})
            cells = "  ".join(f"{times[L]:7.3f} ({times[L] / times[default]:.2f})" for L in lens)
            print(f"{op:6s} {B:3d} {T:5d} {H:2d} {K:3d} {default:7d}  {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
