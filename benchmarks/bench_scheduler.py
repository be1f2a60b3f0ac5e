"""The serving scheduler without HTTP: time to first token and throughput of `aviary.serve.scheduler.Scheduler`
driven in-process, the same requests and pattern as `bench_serve.py` (c workers, each sending its next request
when its last one is done, 2c requests in all), for several prefill budgets (`--max-prefill-tokens`).

What `bench_serve.py` measures minus the web layer, the client and their share of the cores: the difference
between the two is what HTTP and the benchmark's own client cost at that concurrency.

    python benchmarks/bench_scheduler.py                               # c = 64, budgets 4096 1024 512
    python benchmarks/bench_scheduler.py --levels 32 64 --budgets 1024 --repeats 5 --json out.json

The server's process settings apply (`settle_for_serving`: gc.freeze and keep_freed_memory), as in `aviary serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import percentile, request_body, write_model  # noqa: E402


def run_level(scheduler, tokenizer, args, concurrency: int, seed: int) -> dict:
    """One closed-loop level: `concurrency` workers, 2 x concurrency requests. Returns TTFT p50/p99 and tokens/s."""
    from aviary.generation import SamplingParams
    from aviary.serve.scheduler import Done, Failed, Job, Piece

    n_requests = 2 * concurrency
    lock, finished = threading.Lock(), threading.Event()
    ttft, errors, counts = [], [], {"done": 0, "tokens": 0}

    def submit(worker: int, k: int) -> None:
        body = request_body(args, seed + worker * 1000 + k)
        sent, first = time.perf_counter(), []

        def sink(event) -> None:  # on the scheduler's thread
            if isinstance(event, Piece) and event.text and not first:
                first.append(time.perf_counter() - sent)
            if isinstance(event, Done | Failed):
                with lock:
                    if isinstance(event, Failed):
                        errors.append(event.message)
                    else:
                        counts["tokens"] += event.completion_tokens
                        ttft.extend(first)
                    counts["done"] += 1
                    last = counts["done"] == n_requests
                if k + 1 < n_requests // concurrency:
                    submit(worker, k + 1)
                elif last:
                    finished.set()

        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=worker)
        scheduler.submit(Job([tokenizer.encode(body["prompt"])], params, sink))

    t0 = time.perf_counter()
    for worker in range(concurrency):
        submit(worker, 0)
    if not finished.wait(args.level_cap_s):
        raise SystemExit(f"level {concurrency} did not finish in {args.level_cap_s} s")
    wall = time.perf_counter() - t0
    return {"ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tokens_per_s": counts["tokens"] / wall, "errors": len(errors)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: a random-weight RWKV-7, see --layers/--width)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the bench_serve server's default)")
    p.add_argument("--levels", type=int, nargs="+", default=[64])
    p.add_argument("--budgets", type=int, nargs="+", default=[4096, 1024, 512], help="--max-prefill-tokens values")
    p.add_argument("--repeats", type=int, default=3, help="runs of each level and budget (medians reported)")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cache-mb", type=float, default=32)
    p.add_argument("--level-cap-s", type=float, default=300)
    p.add_argument("--json", default="runs/bench_scheduler.json", help="write the results here")
    args = p.parse_args()
    if min(args.levels + args.budgets + [args.repeats, args.threads]) < 1:
        p.error("--levels, --budgets, --repeats and --threads must be >= 1")

    import torch

    import aviary
    from aviary.commands.serve import settle_for_serving
    from aviary.generation import Engine, StateCache
    from aviary.serve.scheduler import Scheduler

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_model(tmp, args)
        model = aviary.load(path)
    tokenizer = aviary.load_tokenizer("world", version=model.config.version)
    settle_for_serving()
    results = {"command": " ".join(sys.argv), "python": platform.python_version(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
               "model": os.path.basename(path) if args.model else f"random RWKV-7 L{args.layers} D{args.width}",
               "runs": []}
    print(f"{'c':>4} {'budget':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>8}   (medians of {args.repeats})")
    seed = 0
    for c in args.levels:
        for budget in args.budgets:
            cache = StateCache(int(args.cache_mb * 2**20)) if args.cache_mb > 0 else None
            scheduler = Scheduler(Engine(model, tokenizer, cache=cache), max_batch=max(64, c), max_queue=4 * c,
                                  max_prefill_tokens=budget).start()
            try:
                run_level(scheduler, tokenizer, args, min(c, 4), seed=10**7)  # warm-up, not reported
                runs = []
                for _ in range(args.repeats):
                    seed += 10**5  # distinct prompts: no prefix-cache hits between runs
                    runs.append(run_level(scheduler, tokenizer, args, c, seed))
            finally:
                scheduler.close()
            row = {"concurrency": c, "max_prefill_tokens": budget, "runs": runs,
                   **{k: statistics.median(r[k] for r in runs) for k in ("ttft_p50_s", "ttft_p99_s", "tokens_per_s")},
                   "errors": sum(r["errors"] for r in runs)}
            results["runs"].append(row)
            print(f"{c:>4} {budget:>6} {row['ttft_p50_s']:>9.3f} {row['ttft_p99_s']:>9.3f} {row['tokens_per_s']:>8.1f}"
                  f"{'   errors ' + str(row['errors']) if row['errors'] else ''}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["errors"] for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
