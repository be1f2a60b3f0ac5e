"""Fine-tuning cost on this machine: peak memory and tokens/s of one optimizer step (forward, CE + L2Wrap,
backward, AdamW) of full fine-tuning against LoRA and state tuning (`aviary.peft`), and of samples run in
chunks that carry the state (`aviary.train.chunks`, `train.chunk_len`) against one chunk. Each row runs in a
fresh process.

Memory is the process's resident set: its peak during two steps (`getrusage` ru_maxrss) minus the resident set
just before them (the model built and the inputs allocated), so the number is what training adds: gradients,
optimizer state, activations, logits, stored chunk states. Tokens/s is the second step's.

    python benchmarks/bench_finetune.py methods              # v7 L12 C768, vocab 65536, ctx 256, batch 1
    python benchmarks/bench_finetune.py chunks               # v7 L6 C256, chunk 128, samples of 1, 4, 16 chunks
    python benchmarks/bench_finetune.py chunks --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETUPS = {  # what each table measures, and its defaults
    "methods": {"n_layer": 12, "n_embd": 768, "ctx": 256, "batch": 1,
                "rows": ["none:1:full", "lora:1:full", "state:1:full"]},
    "chunks": {"n_layer": 6, "n_embd": 256, "ctx": 128, "batch": 2,
               "rows": ["none:1:full", "none:4:full", "none:4:truncated", "none:4:one pass", "none:16:full",
                        "none:16:truncated", "none:16:one pass"]},
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args: argparse.Namespace, method: str, n_chunks: int, mode: str) -> dict:
    """One row: `method` (none = every weight), samples of n_chunks x ctx tokens in `mode`."""
    import torch

    from aviary.model import RWKV
    from aviary.testing import random_config
    from aviary.train.chunks import micro_batch_backward
    from aviary.train.optim import make_optimizer

    torch.set_num_threads(args.threads)
    model = RWKV(random_config(args.version, n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab,
                               head_size=64)).train()
    if method != "none":
        from aviary.peft import PeftConfig, apply_peft

        apply_peft(model, PeftConfig(method, rank=args.rank, alpha=args.rank), seed=0)
    optimizer = make_optimizer(model, 1e-4, (0.9, 0.99), 1e-18, 0.001)
    T = args.ctx * n_chunks
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, T), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, T), generator=g)
    weight = torch.full((args.batch, T), 1.0 / (args.batch * T))
    before = rss_mib()
    for _ in range(2):
        t = time.perf_counter()
        micro_batch_backward(lambda a, s, last: model(a, s, last_only=last), x, y, weight,
                             chunk_len=0 if mode == "one pass" else args.ctx, mode=mode.replace("one pass", "full"),
                             l2wrap=1e-4)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "tokens": T, "chunks": n_chunks, "mode": mode,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "added_mib": round(peak - before, 1), "peak_rss_mib": round(peak, 1),
            "tok_per_s": round(args.batch * T / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=sorted(SETUPS))
    ap.add_argument("--version", type=int, default=7)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--ctx", type=int, help="tokens per sample (methods) or per chunk (chunks)")
    ap.add_argument("--rows", help="comma list of METHOD:CHUNKS:MODE (default: the table's)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank)")
    ap.add_argument("--batch", type=int, help="sequences per step (methods: 1, RWKV-PEFT's micro-batch in its "
                    "memory table; chunks: 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name, value in SETUPS[args.table].items():
        if name != "rows" and getattr(args, name) is None:
            setattr(args, name, value)
    if args.child:
        method, n, mode = args.child.split(":")
        print(json.dumps(child(args, method, int(n), mode)))
        return
    rows = []
    print(f"RWKV-{args.version} L{args.n_layer} C{args.n_embd} vocab {args.vocab}, batch {args.batch}, "
          f"{'ctx' if args.table == 'methods' else 'chunk'} {args.ctx}, {args.threads} thread(s)")
    print(f"{'method':>6} {'tokens':>7} {'chunks':>6} {'mode':>10} {'trainable':>12} {'added MiB':>10} "
          f"{'peak RSS MiB':>13} {'tok/s':>7}")
    for row in (args.rows.split(",") if args.rows else SETUPS[args.table]["rows"]):
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", row]
        r = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        rows.append(r)
        print(f"{r['method']:>6} {r['tokens']:>7} {r['chunks']:>6} {r['mode']:>10} {r['trainable']:>12,} "
              f"{r['added_mib']:>10} {r['peak_rss_mib']:>13} {r['tok_per_s']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
