"""GPU numbers in one run: the time-mix against flash attention, RWKV-7 training throughput and MFU, decode tokens/s.

1. time-mix forward+backward per version and backend (every backend of the version's op but the reference loop:
   chunked, fla, triton, any registered one), against PyTorch's flash scaled-dot-product attention (causal, bf16),
   at 1k, 4k and 16k tokens: B=1 sequence of H=12 heads of 64 channels (D=768). The RWKV ops take float32 (their
   contract); the attention bf16 (flash attention's type).
2. training: an RWKV-7 L12-D768 (vocabulary 65536) step as `aviary train` runs it (bf16 autocast, cross-entropy
   with L2Wrap, backward, clipping, AdamW) per backend; tokens/s and model FLOPs utilisation.
      model FLOPs per token = 6 x (parameters in matrix products: every Linear, the LoRA factors and the head)
                              + 3 x L x H x 8 N^2 (the delta rule's state decay, delete, write and read,
                                forward, backward counted as twice the forward)
      MFU = tokens/s x model FLOPs per token / the GPU's dense bf16 peak (a table by device name below, or
            --peak-tflops), the formula of benchmarks/bench_train.py.
3. decode: tokens/s of one-token steps at batch 1 and 64 of the same model in bf16: the eager step, the CUDA-graph
   step (aviary.generation.cuda_graph), and the whole engine (sampling included) with and without graphs.

Each measurement runs in its own try/except: a failure is recorded ("error") and the rest goes on; a part that
cannot run here is recorded as "skipped" with the reason. Results go to OUT/gpu_results.json after every
measurement (a run cut short keeps what it measured; a run of some --parts keeps the file's other parts, so the
parts can run as separate processes with their own time limits, as scripts/gpu_check.sh does) and a markdown
table of the whole file to stdout.

    python benchmarks/bench_gpu.py --out gpu-results            # on a GPU (scripts/gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --cpu-smoke --out /tmp/smoke  # tiny shapes on a CPU: the same code paths
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_flops_per_token  # noqa: E402

# dense bf16 tensor-core peaks, TFLOP/s, by a part of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0))


@dataclass(frozen=True)
class Shapes:
    """What each part runs: the GPU's sizes, or a CPU smoke test's."""

    timemix_tokens: tuple[int, ...] = (1024, 4096, 16384)
    heads: int = 12
    head_size: int = 64
    train_layers: int = 12
    train_width: int = 768
    vocab: int = 65536
    train_ctx: int = 4096
    train_batch: int = 4
    train_steps: int = 5
    decode_batches: tuple[int, ...] = (1, 64)
    decode_steps: int = 64
    repeats: int = 5


CPU_SMOKE = Shapes(timemix_tokens=(32, 48), heads=2, head_size=8, train_layers=1, train_width=32, vocab=64,
                   train_ctx=32, train_batch=1, train_steps=1, decode_batches=(1, 4), decode_steps=2, repeats=1)


@dataclass
class Results:
    path: Path | None
    data: dict = field(default_factory=dict)

    def add(self, part: str, row: dict) -> None:
        self.data.setdefault(part, []).append(row)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def attempt(results: Results, part: str, row: dict, measure: Callable[[], dict]) -> None:
    """row + measure()'s numbers, or row + {"error": ...}; the traceback goes to stderr."""
    try:
        row = {**row, **measure()}
    except Exception as e:  # every failure is a result: record it and go on
        traceback.print_exc()
        row = {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results.add(part, row)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call (which also compiles Triton kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# ---- 1. time-mix against attention -------------------------------------------------------------------------------


def timemix_inputs(version: int, T: int, s: Shapes, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """(op, inputs) for one version's time-mix at T tokens, float32 leaves that need gradients."""
    from aviary.ops import delta_rule, gla, wkv4

    g = torch.Generator(device="cpu").manual_seed(version)
    H, N = s.heads, s.head_size

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if version == 4:  # per channel, C = H * N
        C = H * N
        w, u = -torch.exp(randn(C)), randn(C)
        k, v = randn(1, T, C), randn(1, T, C)
        from aviary.ops.wkv4 import empty_state

        state = empty_state(1, C)
        return wkv4, [x.to(device) for x in (w, u, k, v, state)]
    r, k, v = randn(1, T, H, N), randn(1, T, H, N) * N**-0.5, randn(1, T, H, N)
    state = torch.zeros(1, H, N, N)
    if version in (5, 6):
        shape = (1, 1, H, N) if version == 5 else (1, T, H, N)
        logw = -torch.exp(randn(*shape, scale=0.5) - 1)
        return gla, [x.to(device) for x in (r, k, v, logw, randn(H, N), state)]
    logw = -0.6 * torch.sigmoid(randn(1, T, H, N))
    kk = F.normalize(randn(1, T, H, N), dim=-1)
    a, b = -kk, kk * torch.rand(1, T, H, N, generator=g)
    return delta_rule, [x.to(device) for x in (r, logw, k, v, a, b, state)]


def time_timemix(version: int, backend: str, T: int, s: Shapes, device: torch.device) -> dict:
    op, inputs = timemix_inputs(version, T, s, device)
    leaves = [x.requires_grad_() for x in inputs]

    def fwd_bwd():
        y, state = op(*leaves, backend=backend)
        (y.sum() + state.sum()).backward()
        for x in leaves:
            x.grad = None

    return {"fwd_bwd_ms": 1e3 * timed(fwd_bwd, device, s.repeats)}


def time_attention(T: int, s: Shapes, device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, s.heads, T, s.head_size, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    kernel = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def fwd_bwd():
        with sdpa_kernel(kernel):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        q.grad = k.grad = v.grad = None

    return {"kernel": kernel.name.lower(), "dtype": str(dtype).removeprefix("torch."),
            "fwd_bwd_ms": 1e3 * timed(fwd_bwd, device, s.repeats)}


def run_timemix(results: Results, s: Shapes, device: torch.device) -> None:
    from aviary.model import VERSIONS

    for T in s.timemix_tokens:
        note = {} if device.type == "cuda" else {"note": "flash attention needs a CUDA device: the math kernel"}
        attempt(results, "attention", {"T": T, **note}, lambda T=T: time_attention(T, s, device))
        for version, spec in sorted(VERSIONS.items()):
            for backend in fast_backends(spec.time_mix.op):
                row = {"version": version, "op": spec.time_mix.op, "backend": backend, "T": T}
                reason = skip_reason(backend, device)
                if reason:
                    results.add("timemix", {**row, "skipped": reason})
                else:
                    attempt(results, "timemix", row,
                            lambda v=version, b=backend, T=T: time_timemix(v, b, T, s, device))


def fast_backends(op: str) -> list[str]:
    """Every backend of `op` but the reference loop (one token at a time: minutes at 16k tokens)."""
    from aviary.ops import backends_of

    return [b for b in backends_of(op) if b != "recurrent"]


def skip_reason(backend: str, device: torch.device) -> str | None:
    if device.type != "cuda" and backend != "chunked":
        return f"the {backend!r} backend is a GPU one: it needs a CUDA device"
    return None


# ---- 2. training ---------------------------------------------------------------------------------------------------


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for part, tflops in PEAK_BF16_TFLOPS:
        if part in name:
            return tflops * 1e12, f"table: {part}"
    return None, f"{name} is not in the peak table (give --peak-tflops)"


def time_training(backend: str, s: Shapes, device: torch.device, peak: float | None) -> dict:
    from aviary.model import RWKV
    from aviary.train.init import init_model, model_config
    from aviary.train.optim import L2Wrap, make_optimizer

    config = model_config(7, s.train_layers, s.train_width, s.vocab, head_size=s.head_size)
    model = init_model(RWKV(config, backend=backend).to(device))
    opt = make_optimizer(model, 1e-4, (0.9, 0.99), 1e-18, 0.001)
    x = torch.randint(0, s.vocab, (s.train_batch, s.train_ctx + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, _ = model(x[:, :-1])
        logits = logits.float()
        loss = F.cross_entropy(logits.reshape(-1, s.vocab), x[:, 1:].reshape(-1))
        L2Wrap.apply(loss, logits, 1e-4).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(step, device, s.train_steps)
    tokens_per_s = s.train_batch * s.train_ctx / step_s
    flops = model_flops_per_token(model)
    row = {"parameters": model.num_parameters, "step_s": step_s, "tokens_per_s": tokens_per_s,
           "model_gflop_per_token": flops / 1e9, "achieved_tflops": tokens_per_s * flops / 1e12,
           "mfu": None if peak is None else tokens_per_s * flops / peak}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run_training(results: Results, s: Shapes, device: torch.device, peak: float | None) -> None:
    for backend in fast_backends("delta_rule"):
        row = {"model": f"RWKV-7 L{s.train_layers}-D{s.train_width}", "vocab": s.vocab, "ctx": s.train_ctx,
               "batch": s.train_batch, "precision": "bf16 autocast", "backend": backend}
        reason = skip_reason(backend, device)
        if reason:
            results.add("train", {**row, "skipped": reason})
        else:
            attempt(results, "train", row, lambda b=backend: time_training(b, s, device, peak))


# ---- 3. decode -----------------------------------------------------------------------------------------------------


class IdTokenizer:
    """Every id is one byte of text: enough for the engine to run a model of any vocabulary."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 + 1 for c in text]

    def decode_bytes(self, ids) -> bytes:
        return b"x" * len(list(ids))


def decode_model(s: Shapes, device: torch.device):
    from aviary.model import RWKV
    from aviary.train.init import init_model, model_config

    config = model_config(7, s.train_layers, s.train_width, s.vocab, head_size=s.head_size)
    model = init_model(RWKV(config).to(device)).eval()
    return model.to(torch.bfloat16) if device.type == "cuda" else model


def time_decode(model, batch: int, mode: str, s: Shapes, device: torch.device) -> dict:
    from aviary.generation import Engine, SamplingParams
    from aviary.generation.cuda_graph import GraphDecoder

    tokens = torch.randint(1, s.vocab, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    if mode.startswith("engine"):
        params = SamplingParams(temperature=1.0, max_new_tokens=s.decode_steps, stop_token_ids=())
        engine = Engine(model, IdTokenizer(), cuda_graphs=mode == "engine+graph")  # its graphs: captured once

        def run():
            for i in range(batch):
                engine.add([tokens[i]], params)
            while engine.has_work:
                engine.step()

        seconds = timed(run, device, 1)
        return {"tokens_per_s": batch * s.decode_steps / seconds, "includes": "prefill of 1 token and sampling"}
    state = model.init_state(batch)
    if mode == "graph":
        decoder = GraphDecoder(model)

        def step():
            nonlocal state
            _, state = decoder.step(tokens, state)
    else:
        ids = torch.tensor(tokens, device=device)[:, None]

        def step():
            model(ids, state, last_only=True, inplace=True)

    def run():
        for _ in range(s.decode_steps):
            step()

    with torch.no_grad():
        seconds = timed(run, device, s.repeats)
    return {"tokens_per_s": batch * s.decode_steps / seconds, "step_ms": 1e3 * seconds / s.decode_steps}


def run_decode(results: Results, s: Shapes, device: torch.device) -> None:
    try:
        model = decode_model(s, device)
    except Exception as e:
        traceback.print_exc()
        results.add("decode", {"error": f"building the model: {type(e).__name__}: {e}"})
        return
    for batch in s.decode_batches:
        for mode in ("eager", "graph", "engine", "engine+graph"):
            row = {"model": f"RWKV-7 L{s.train_layers}-D{s.train_width} bf16" if device.type == "cuda" else
                   f"RWKV-7 L{s.train_layers}-D{s.train_width} fp32", "batch": batch, "mode": mode}
            if "graph" in mode and device.type != "cuda":
                results.add("decode", {**row, "skipped": "CUDA graphs need a CUDA device"})
            else:
                attempt(results, "decode", row, lambda b=batch, m=mode: time_decode(model, b, m, s, device))


# ---- the report ----------------------------------------------------------------------------------------------------


def environment(device: torch.device, peak: float | None, peak_source: str, smoke: bool) -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "mode": "cpu-smoke" if smoke else "gpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "fla-core": version("fla-core"),
            "peak_bf16_tflops": None if peak is None else peak / 1e12, "peak_source": peak_source,
            "python": platform.python_version()}


def _cell(row: dict, key: str, fmt: str, main: bool = True) -> str:
    """A table cell: the value, or the error (in the row's main column), or "skipped"."""
    if "error" in row:
        return "error: " + row["error"][:60] if main else "-"
    if "skipped" in row and key not in row:
        return "skipped"
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def markdown(data: dict) -> str:
    env = data.get("environment", {})
    lines = [f"## GPU benchmark: {env.get('device')} (torch {env.get('torch')}, triton {env.get('triton')}, "
             f"fla-core {env.get('fla-core')})", ""]
    if "attention" in data or "timemix" in data:
        lines += timemix_table(data)
    if "train" in data:
        lines += ["", "### Training (bf16 autocast)", "", "| model | backend | tokens/s | MFU | peak memory GiB |",
                  "|---|---|---|---|---|"]
        for r in data["train"]:
            mfu = "-" if r.get("mfu") is None or "error" in r else f"{100 * r['mfu']:.1f} %"
            lines.append(f"| {r['model']} ctx {r['ctx']} x {r['batch']} | {r['backend']} | "
                         f"{_cell(r, 'tokens_per_s', ',.0f')} | {mfu} | {_cell(r, 'peak_memory_gib', '.1f', False)} |")
    if "decode" in data:
        lines += ["", "### Decode", "", "| model | batch | mode | tokens/s |", "|---|---|---|---|"]
        for r in data["decode"]:
            lines.append(f"| {r.get('model', '')} | {r.get('batch', '')} | {r.get('mode', '')} | "
                         f"{_cell(r, 'tokens_per_s', ',.0f')} |")
    return "\n".join(lines)


def timemix_table(data: dict) -> list[str]:
    Ts = data.get("shapes", {}).get("timemix_tokens", [])

    def row_of(label: str, kind: str, rows: dict) -> str:
        return f"| {label} | {kind} | " + " | ".join(_cell(rows[T], "fwd_bwd_ms", ".2f") if T in rows else "-"
                                                     for T in Ts) + " |"

    lines = ["### Time-mix forward+backward (ms) against flash attention", "",
             "| version | backend | " + " | ".join(f"T={T}" for T in Ts) + " |", "|---|---|" + "---|" * len(Ts)]
    att = {r["T"]: r for r in data.get("attention", [])}
    kernel = next((r["kernel"] for r in att.values() if "kernel" in r), "sdpa")
    lines.append(row_of("attention", kernel, att))
    for version, backend in sorted({(r["version"], r["backend"]) for r in data.get("timemix", [])}):
        rows = {r["T"]: r for r in data["timemix"] if (r["version"], r["backend"]) == (version, backend)}
        lines.append(row_of(f"RWKV-{version}", backend, rows))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_results.json (created)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: the code paths, no numbers")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s (default: by name)")
    ap.add_argument("--parts", default="timemix,train,decode", help="comma list of timemix, train, decode")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"timemix", "train", "decode"} or not parts:
        ap.error(f"--parts: choose from timemix, train, decode, got {args.parts!r}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error("--peak-tflops must be positive")
    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on a GPU, or give --cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    shapes = CPU_SMOKE if args.cpu_smoke else Shapes()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results = Results(None if args.out is None else args.out / "gpu_results.json")
    if results.path is not None and results.path.is_file():  # an earlier run's other parts stay (one part a run)
        rerun = parts | ({"attention"} if "timemix" in parts else set())  # the keys this run writes anew
        results.data = {k: v for k, v in json.loads(results.path.read_text()).items() if k not in rerun}
    peak, source = peak_flops(device, args.peak_tflops)
    results.data["environment"] = environment(device, peak, source, args.cpu_smoke)
    results.data["shapes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(shapes).items()}
    results.save()
    t0 = time.perf_counter()
    if "timemix" in parts:
        run_timemix(results, shapes, device)
    if "train" in parts:
        run_training(results, shapes, device, peak)
    if "decode" in parts:
        run_decode(results, shapes, device)
    results.data.setdefault("wall_s", {}).update({part: time.perf_counter() - t0 for part in parts})
    results.save()
    print(markdown(results.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
