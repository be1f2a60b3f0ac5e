"""Load test of `aviary serve` on loopback: throughput and time to first token at several concurrencies,
then server memory over a soak of concurrent streams; or (--sessions) the second turn of conversations whose
histories grow, against the first.

    python benchmarks/bench_serve.py                       # random-weight RWKV-7 written to a temp dir
    python benchmarks/bench_serve.py --model model.pth --levels 1 8 32 64 --soak-s 120 --json out.json
    python benchmarks/bench_serve.py --sessions            # second-turn prefill vs history length

It starts `python -m aviary serve` as a child process on 127.0.0.1 (a free port), so the server's memory is
its own and the client does not share its interpreter. For each concurrency c it sends max(8, 2c) streaming
completions (each with the same prompt length and max_tokens, ignoring nothing: a stop token ends a request
early and is counted as it is), c at a time, and reports aggregate generated tokens/s and time-to-first-token
p50/p99, next to c = 1, which is serving the same requests one at a time. Then it keeps `--soak-streams`
streams open for `--soak-s` seconds and samples the server's resident memory every few seconds.
Everything is bounded: requests per level, a wall-clock cap per level, and the soak duration.

--sessions: for each history length H (--history-tokens, about H tokens of earlier turns in the chat format),
`--conversations` distinct conversations each send a first turn (the history and a question: all of it is
prefilled) and then their second turn (the same messages, the model's reply and a new question), one request
at a time, streamed. It reports the time to first token of both turns and what the server computed for the
second (prompt tokens minus `cached_tokens`): with the prefix cache keeping the state after the first turn,
that is the reply and the new question only, whatever H.

The JSON records `aviary.cpu.backend_info()` ("backend", this process: the same environment as the server's,
AVIARY_CPU_ISA included) and the server model's decode path ("decode_path"), taken by loading the model once
in a short-lived process with the server's threads before the server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import backend_info, probe_decode_path  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB (psutil, or /proc/PID/status where psutil is not installed)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
        raise RuntimeError(f"no VmRSS for process {pid}; pip install psutil") from None
    return psutil.Process(pid).memory_info().rss / 2**20


class Stats:
    def __init__(self):
        self.ttft: list[float] = []
        self.tokens = 0
        self.requests = 0
        self.errors: list[str] = []


async def one_request(client, url: str, body: dict, stats: Stats) -> None:
    t0 = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                stats.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    stats.errors.append(f"stream error: {chunk['error']['message']}")
                    return
                if chunk.get("usage"):
                    stats.tokens += chunk["usage"]["completion_tokens"]
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
            if not done:
                stats.errors.append("stream ended without [DONE]")
                return
    except Exception as e:  # a timeout, a refused connection: all count as errors
        stats.errors.append(f"{type(e).__name__}: {e}")
        return
    stats.requests += 1
    if first is not None:
        stats.ttft.append(first)


def request_body(args, i: int) -> dict:
    # distinct prompts of about the same length (no prefix shared beyond "Request")
    words = " ".join(f"w{(i * 7919 + k) % 1000}" for k in range(args.prompt_words))
    return {"model": "bench", "prompt": f"Request {i}: {words}", "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}


SERVER_SERIES = ("aviary_steps_total", "aviary_step_rows_total", "aviary_step_seconds_sum",
                 "aviary_prefill_seconds_sum", "aviary_prefill_seconds_count",
                 "aviary_time_to_first_token_seconds_sum", "aviary_time_to_first_token_seconds_count")


def server_counts(base: str) -> dict[str, float]:
    """The server's running totals of SERVER_SERIES (0 for a series it does not have)."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=10).text
    values = dict.fromkeys(SERVER_SERIES, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def server_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server did between two `server_counts`: decode steps, prefill passes, its own mean TTFT."""
    d = {k: after[k] - before[k] for k in SERVER_SERIES}
    steps, passes = max(d["aviary_steps_total"], 1), max(d["aviary_prefill_seconds_count"], 1)
    return {"steps": int(d["aviary_steps_total"]), "mean_batch": round(d["aviary_step_rows_total"] / steps, 1),
            "step_ms": round(1000 * d["aviary_step_seconds_sum"] / steps, 1),
            "prefill_passes": int(d["aviary_prefill_seconds_count"]),
            "prefill_ms": round(1000 * d["aviary_prefill_seconds_sum"] / passes, 1),
            "ttft_mean_s": round(d["aviary_time_to_first_token_seconds_sum"]
                                 / max(d["aviary_time_to_first_token_seconds_count"], 1), 3)}


async def run_level(args, base: str, concurrency: int) -> dict:
    import httpx

    n_requests = max(8, 2 * concurrency)
    stats = Stats()
    queue = list(range(n_requests))
    deadline = time.perf_counter() + args.level_cap_s
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        async def worker():
            while queue and time.perf_counter() < deadline:
                i = queue.pop()
                await one_request(client, base + "/v1/completions", request_body(args, i + 1000 * concurrency), stats)

        counts = server_counts(base)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": stats.requests, "planned": n_requests,
            "server": server_side(counts, server_counts(base)),
            "tokens": stats.tokens, "wall_s": round(wall, 2), "tokens_per_s": round(stats.tokens / wall, 1),
            "ttft_p50_s": round(percentile(stats.ttft, 50), 3), "ttft_p99_s": round(percentile(stats.ttft, 99), 3),
            "errors": len(stats.errors), "error_samples": stats.errors[:3]}


async def soak(args, base: str, pid: int) -> dict:
    import httpx

    stats = Stats()
    samples = [(0.0, rss_mb(pid))]
    stop_at = time.perf_counter() + args.soak_s
    limits = httpx.Limits(max_connections=args.soak_streams + 8, max_keepalive_connections=args.soak_streams + 8)
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        async def worker():
            while time.perf_counter() < stop_at:
                await one_request(client, base + "/v1/completions", request_body(args, next(counter)), stats)

        async def sampler():
            t0 = time.perf_counter()
            while time.perf_counter() < stop_at:
                await asyncio.sleep(args.sample_every_s)
                samples.append((round(time.perf_counter() - t0, 1), rss_mb(pid)))

        t0 = time.perf_counter()
        await asyncio.gather(sampler(), *(worker() for _ in range(args.soak_streams)))
        wall = time.perf_counter() - t0
    samples.append((round(wall, 1), rss_mb(pid)))
    later = [m for t, m in samples if t >= wall / 2]
    return {"streams": args.soak_streams, "seconds": round(wall, 1), "requests": stats.requests,
            "tokens": stats.tokens, "tokens_per_s": round(stats.tokens / wall, 1), "errors": len(stats.errors),
            "error_samples": stats.errors[:3], "rss_mb_start": round(samples[0][1], 1),
            "rss_mb_end": round(samples[-1][1], 1), "rss_mb_max": round(max(m for _, m in samples), 1),
            "rss_mb_second_half_spread": round(max(later) - min(later), 1),
            "rss_mb_samples": [(t, round(m, 1)) for t, m in samples]}


def history_messages(tokens: int, conversation: int) -> list[dict]:
    """A system prompt and earlier user/assistant turns of about `tokens` tokens (a word "w123 " is about 3
    tokens of the World vocabulary; turns of about 300 tokens)."""
    messages = [{"role": "system", "content": f"You are assistant number {conversation}."}]
    words = 0
    while words * 3 < tokens:
        n = min(100, max(1, (tokens - words * 3) // 3))
        text = " ".join(f"w{(conversation * 7919 + words + k) % 1000}" for k in range(n))
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": text})
        words += n
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": "Noted."})
    return messages


async def chat_turn(client, url: str, messages: list[dict], args) -> dict:
    """One streamed chat request: time to the first generated text (or the end, if the reply is empty), the
    reply, and the usage."""
    body = {"model": "bench", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, first, reply, usage = time.perf_counter(), None, "", None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content") or choice["finish_reason"]:
                    first = first if first is not None else time.perf_counter() - t0
                    reply += choice["delta"].get("content") or ""
    return {"ttft_s": first, "reply": reply, "usage": usage}


async def sessions(args, base: str) -> list[dict]:
    import httpx

    rows = []
    async with httpx.AsyncClient(timeout=args.request_timeout_s) as client:
        url = base + "/v1/chat/completions"
        for h in args.history_tokens:
            turns = []
            for c in range(args.conversations):
                messages = history_messages(h, 100 * h + c) + [{"role": "user", "content": f"Question {c}?"}]
                one = await chat_turn(client, url, messages, args)
                messages += [{"role": "assistant", "content": one["reply"] or "."},
                             {"role": "user", "content": "And the next one?"}]
                two = await chat_turn(client, url, messages, args)
                turns.append((one, two))
            def median(values):
                return round(percentile(values, 50), 4)

            def computed(turn):
                return turn["usage"]["prompt_tokens"] - turn["usage"]["prompt_tokens_details"]["cached_tokens"]

            rows.append({"history_tokens": h, "conversations": args.conversations,
                         "turn1_prompt_tokens": median([one["usage"]["prompt_tokens"] for one, _ in turns]),
                         "turn1_computed_tokens": median([computed(one) for one, _ in turns]),
                         "turn1_ttft_s": median([one["ttft_s"] for one, _ in turns]),
                         "turn2_prompt_tokens": median([two["usage"]["prompt_tokens"] for _, two in turns]),
                         "turn2_computed_tokens": median([computed(two) for _, two in turns]),
                         "turn2_ttft_s": median([two["ttft_s"] for _, two in turns])})
            r = rows[-1]
            print(f"{h:>8} {r['turn1_prompt_tokens']:>9} {r['turn1_computed_tokens']:>9} {r['turn1_ttft_s']:>9} "
                  f"{r['turn2_prompt_tokens']:>9} {r['turn2_computed_tokens']:>9} {r['turn2_ttft_s']:>9}", flush=True)
    return rows


def write_model(directory: str, args) -> str:
    from aviary.testing import random_config, save_random_checkpoint

    path = os.path.join(directory, "bench-v7.safetensors")
    config = random_config(7, n_layer=args.layers, n_embd=args.width, head_size=64, vocab_size=65536)
    save_random_checkpoint(path, config, seed=0)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: a random-weight RWKV-7, see --layers/--width)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--cache-mb", type=float, default=32,
                   help="the server's prefix cache (every distinct prompt is cached: it fills during the levels)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="the server's --max-prefill-tokens (default: the server's own default)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--level-cap-s", type=float, default=120, help="stop starting requests of a level after this")
    p.add_argument("--request-timeout-s", type=float, default=300)
    p.add_argument("--soak-s", type=float, default=120, help="0 skips the memory soak")
    p.add_argument("--soak-streams", type=int, default=64)
    p.add_argument("--sample-every-s", type=float, default=5)
    p.add_argument("--json", default="runs/bench_serve.json", help="write the results here")
    p.add_argument("--sessions", action="store_true",
                   help="instead of the levels and the soak: second-turn prefill against the history's length")
    p.add_argument("--history-tokens", type=int, nargs="+", default=[0, 500, 2000, 6000])
    p.add_argument("--conversations", type=int, default=3, help="conversations per history length (--sessions)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_model(tmp, args)
        path_info = probe_decode_path(model, threads=args.threads)
        print(f"decode path: {path_info.get('summary') or path_info.get('error')}", flush=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "aviary", "serve", model, "--port", str(port), "--model-name", "bench",
               "--max-batch", str(max(64, *args.levels, args.soak_streams)), "--max-queue", "1024",
               "--threads", str(args.threads), "--cache-mb", str(args.cache_mb), "--log-level", "warning"]
        if args.max_prefill_tokens is not None:
            cmd += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
        server = subprocess.Popen(cmd)
        try:
            import httpx

            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            idle_mb = rss_mb(server.pid)
            results = {"command": " ".join(sys.argv), "server": " ".join(cmd[1:]), "python": platform.python_version(),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                       "model": os.path.basename(model) if args.model else
                       f"random RWKV-7 L{args.layers} D{args.width} vocab 65536",
                       "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
                       "temperature": args.temperature, "rss_mb_idle": round(idle_mb, 1),
                       "backend": backend_info(), "decode_path": path_info, "levels": []}
            asyncio.run(run_level(args, base, 4))  # warm-up (allocations, caches), not reported
            if args.sessions:
                args.levels, args.soak_s = [], 0
                print(f"{'history':>8} {'t1 prompt':>9} {'t1 ran':>9} {'t1 TTFT':>9} {'t2 prompt':>9} {'t2 ran':>9} "
                      f"{'t2 TTFT':>9}   (tokens; seconds; medians of {args.conversations})")
                results["sessions"] = asyncio.run(sessions(args, base))
            else:
                print(f"{'conc':>5} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'vs 1-at-a-time':>14} "
                      f"{'TTFT p50':>9} {'TTFT p99':>9} {'errors':>6}")
            for c in args.levels:
                r = asyncio.run(run_level(args, base, c))
                results["levels"].append(r)
                one = results["levels"][0]["tokens_per_s"] if results["levels"][0]["concurrency"] == 1 else None
                r["speedup_vs_sequential"] = round(r["tokens_per_s"] / one, 2) if one else None
                print(f"{c:>5} {r['requests']:>5} {r['tokens']:>7} {r['wall_s']:>7} {r['tokens_per_s']:>8} "
                      f"{(str(r['speedup_vs_sequential']) + 'x') if one else '-':>14} {r['ttft_p50_s']:>9} "
                      f"{r['ttft_p99_s']:>9} {r['errors']:>6}   server: {r['server']}", flush=True)
            if args.soak_s > 0:
                s = asyncio.run(soak(args, base, server.pid))
                results["soak"] = s
                print(f"soak: {s['streams']} streams for {s['seconds']} s, {s['requests']} requests, "
                      f"{s['tokens_per_s']} tok/s, errors {s['errors']}; server RSS {s['rss_mb_start']} -> "
                      f"{s['rss_mb_end']} MB (max {s['rss_mb_max']}, spread over the second half "
                      f"{s['rss_mb_second_half_spread']} MB)")
            metrics = httpx.get(base + "/metrics", timeout=10).text
            def metric(name: str) -> float:
                return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))

            results["server_failed_requests"] = metric('aviary_requests_total{status="failed"}')
            results["prefix_cache_mb"] = round(metric("aviary_prefix_cache_bytes") / 2**20, 1)
            results["mean_batch"] = round(metric("aviary_step_rows_total") / max(metric("aviary_steps_total"), 1), 1)
            errors = sum(r["errors"] for r in results["levels"]) + results.get("soak", {}).get("errors", 0)
            print(f"errors: {errors} client-side, {results['server_failed_requests']:g} server-side; "
                  f"prefix cache {results['prefix_cache_mb']} MB; mean batch {results['mean_batch']}")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
