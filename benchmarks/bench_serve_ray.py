"""What the Ray router costs: `aviary serve` on its own against `aviary serve --ray --replicas N` on the same
model, one after the other on this machine.

    python benchmarks/bench_serve_ray.py                   # random-weight RWKV-7 (bench_serve.py's), 2 replicas
    python benchmarks/bench_serve_ray.py --model model.pth --replicas 4 --threads 2 --json out.json

For each server it measures the median latency of `--requests` one-token completions sent one at a time (the
fixed cost of a request: on Ray, the proxy and the router hop), then the wall time of `--streams` concurrent
streamed completions of `--max-tokens` tokens, each its own session. Both servers are started as child
processes (`python -m aviary serve`) with --threads; on a machine with fewer cores than replicas x threads,
the replicas share them and Ray cannot be faster than one batched engine. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, write_model  # noqa: E402


def start(model: str, args, extra: list[str], log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "aviary", "serve", model, "--port", str(port), "--model-name", "bench",
           "--threads", str(args.threads), "--log-level", "warning", *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)  # Ray's controller logs at info
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while True:  # up, with every replica running (the router's /health names each)
        try:
            health = httpx.get(url + "/health", timeout=5)
            if health.status_code == 200 and '"down"' not in health.text:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise SystemExit(f"the server did not start: {' '.join(cmd)} (its log: {log.name})")
        time.sleep(0.5)


def measure(url: str, args) -> dict:
    body = {"model": "bench", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    latencies = []
    for i in range(args.requests):
        t0 = time.perf_counter()
        httpx.post(url + "/v1/completions", json=body, headers={"X-Session-Id": f"one-{i}"},
                   timeout=60).raise_for_status()
        latencies.append(time.perf_counter() - t0)

    def stream(i: int) -> int:
        body = {"model": "bench", "prompt": f"Story {i}:", "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"X-Session-Id": f"stream-{i}"},
                          timeout=300) as response:
            response.raise_for_status()
            return sum(line.startswith("data: {") for line in response.iter_lines())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.streams) as pool:
        chunks = sum(pool.map(stream, range(args.streams)))
    return {"request_ms_p50": round(statistics.median(latencies) * 1000, 1),
            "streams_wall_s": round(time.perf_counter() - t0, 2), "stream_chunks": chunks,
            "load": round(os.getloadavg()[0], 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: a random-weight RWKV-7, see --layers/--width)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server, and of each replica")
    p.add_argument("--requests", type=int, default=30, help="one-token completions, one at a time")
    p.add_argument("--streams", type=int, default=32, help="concurrent streamed completions")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", default="runs/bench_serve_ray.json", help="write the results here")
    args = p.parse_args()

    results = {"command": " ".join(sys.argv), "python": platform.python_version(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": []}
    print(f"{'server':>16} {'request p50 ms':>15} {f'{args.streams} streams s':>13} {'chunks':>7} {'load':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_model(tmp, args)
        for name, extra in (("aviary serve", []), (f"--ray x{args.replicas}", ["--ray", "--replicas",
                                                                               str(args.replicas)])):
            log = open(os.path.join(tmp, "server.log"), "w")  # noqa: SIM115 (closed below, after the server)
            server, url = start(model, args, extra, log)
            try:
                r = {"server": name, **measure(url, args)}
            finally:
                server.send_signal(signal.SIGTERM)  # --ray: removes the application and stops its local Ray
                server.wait(120)
                log.close()
            results["runs"].append(r)
            print(f"{name:>16} {r['request_ms_p50']:>15} {r['streams_wall_s']:>13} {r['stream_chunks']:>7} "
                  f"{r['load']:>5}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
