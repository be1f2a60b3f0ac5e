"""Training throughput on this machine: tokens/s of `aviary.train`'s step (forward, CE + L2Wrap, backward,
clip, AdamW) for a small RWKV-7, and model FLOPs utilisation against the matmul peak measured in the same run.

Model FLOPs per token = 6 x (parameters used in matmuls: every Linear, the LoRA factors and the head; the
embedding is a lookup) + the delta-rule state update (fwd+bwd ~ 3 x 2 x 4 N^2 per head per token). The peak is
the best of a few square matmuls (fp32 and bf16) on the same threads, so MFU is relative to what this CPU
actually delivers, not to a datasheet.

    python benchmarks/bench_train.py                       # defaults: v7 L4 C256, ctx 256, batch 4
    python benchmarks/bench_train.py --threads 2 --precision bf16 --json out.json

Fine-tuning (LoRA and state tuning against full fine-tuning, and chunked samples) has its own table, with
peak memory per method in a fresh process: benchmarks/bench_finetune.py.

The JSON also records `aviary.cpu.backend_info()` ("backend") and the model's decode path ("decode_path", what
a one-token step of this model would run on; training's forward and backward are torch's).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import backend_info, decode_path, model_flops_per_token  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", type=int, default=7)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from aviary.model import RWKV
    from aviary.train.init import init_model, model_config
    from aviary.train.optim import L2Wrap, make_optimizer

    peaks = {name: matmul_peak(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    model = init_model(RWKV(model_config(args.version, args.n_layer, args.n_embd, args.vocab)))
    opt = make_optimizer(model, 1e-3, (0.9, 0.99), 1e-18, 0.001)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.ctx + 1), generator=g)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up allocators and is not counted
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits, _ = model(x[:, :-1])
        logits = logits.float()
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), x[:, 1:].reshape(-1))
        L2Wrap.apply(loss, logits, 1e-4).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # median
    tokens = args.batch * args.ctx
    tok_s = tokens / step_s
    flops_tok = model_flops_per_token(model)
    achieved = tok_s * flops_tok
    peak = peaks[args.precision]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "config": vars(args), "parameters": model.num_parameters,
        "step_s": step_s, "tokens_per_s": tok_s, "model_gflop_per_token": flops_tok / 1e9,
        "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
        "mfu": achieved / peak, "backend": backend_info(), "decode_path": decode_path(model),
    }
    print(f"RWKV-{args.version} L{args.n_layer} C{args.n_embd} V{args.vocab}, ctx {args.ctx} x batch {args.batch}, "
          f"{args.precision}, {torch.get_num_threads()} threads, {model.num_parameters / 1e6:.2f}M parameters")
    print(f"{'step (median)':<24}{step_s * 1e3:10.1f} ms")
    print(f"{'tokens/s':<24}{tok_s:10.0f}")
    print(f"{'model GFLOP/token':<24}{flops_tok / 1e9:10.4f}")
    print(f"{'achieved GFLOP/s':<24}{achieved / 1e9:10.1f}")
    print(f"{'matmul peak GFLOP/s':<24}{peaks['fp32'] / 1e9:10.1f} fp32, {peaks['bf16'] / 1e9:.1f} bf16")
    print(f"{'MFU':<24}{100 * result['mfu']:10.1f} %  (vs the {args.precision} peak)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
