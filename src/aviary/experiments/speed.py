"""Time and peak memory of the sequence mixer ("time-mix") against sequence length, as in the Finch paper's
Figures 6-7: RWKV's chunked WKV ops against causal softmax attention and Mamba's selective scan.

Only the mixing operator is measured, never a whole model: its inputs are random tensors of the shapes and
value ranges the models feed it, allocated before the clock starts.

    op          what runs                                                  inputs (H heads of K = 64, D = H K)
    rwkv4       aviary.ops.wkv4, chunked                                   k, v [B, T, D]; w, u [D]
    rwkv5       aviary.ops.gla, chunked, constant per-head decay           r, k, v [B, T, H, K]; logw [1, 1, H, K]
    rwkv6       aviary.ops.gla, chunked, data-dependent decay              r, k, v, logw [B, T, H, K]; u [H, K]
    rwkv7       aviary.ops.delta_rule, chunked                             r, logw, k, v, a, b [B, T, H, K]
    attention   torch scaled_dot_product_attention, causal                 q, k, v [B, H, T, K]
    mamba       aviary.experiments.baselines.selective_scan (PyTorch)      x, dt [B, T, 2D]; A [2D, 16]; B, C [B, T, 16]

Modes: "fwd" (no autograd graph) and "fwdbwd" (forward, then backward into every input tensor; the initial
RWKV state is a constant zero state, as in training from scratch, and gets no gradient).

Time is the median of `repeats` runs after `warmup` runs. Peak memory is what the op allocates on top of its
inputs: on CUDA `max_memory_allocated` after `reset_peak_memory_stats`; on CPU, where torch keeps no such
counter, each point runs in a fresh subprocess that reads the kernel's resident-set high-water mark (VmHWM)
after resetting it (`/proc/self/clear_refs`), with glibc told to hand every large block straight back to the
kernel so that the RSS follows the live tensors (see `_cpu_peak_bytes`).

Run `aviary experiment speed --help`; results and method in docs/evaluation.md, "Speed and memory against
sequence length".
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["OPS", "Preset", "Row", "crossings", "make_inputs", "measure", "plot", "plot_decode_latency", "run",
           "slopes"]

HEAD_SIZE = 64
MAMBA_STATE = 16  # N, Mamba's state size per channel; its inner width is 2 D (expansion factor 2)
MODES = ("fwd", "fwdbwd")

OPS: dict[str, str] = {  # name -> label in the figure
    "rwkv4": "RWKV-4 (wkv4, chunked)",
    "rwkv5": "RWKV-5 (gla, constant decay, chunked)",
    "rwkv6": "RWKV-6 (gla, data-dependent decay, chunked)",
    "rwkv7": "RWKV-7 (delta_rule, chunked)",
    "attention": "softmax attention (torch SDPA, causal)",
    "mamba": "Mamba scan (PyTorch reference, not mamba-ssm's CUDA kernel)",
}


@dataclass(frozen=True)
class Preset:
    """One experiment's settings. `max_seconds` bounds each (op, T, mode) point: a point whose predicted
    wall time (`_predicted_seconds`) would exceed it is skipped and marked in its row's note."""

    lengths: tuple[int, ...]
    batch: int
    width: int  # D = model dimension; H = D / 64 heads
    dtype: str  # of attention and Mamba; the RWKV ops compute in float32 whatever this is (their contract)
    device: str
    warmup: int = 1
    repeats: int = 3
    max_seconds: float = 60.0
    threads: int = 0  # torch CPU threads in each point; 0 = torch's default
    isolate: bool = True  # each point in a fresh subprocess (needed for the CPU memory number)
    ops: tuple[str, ...] = tuple(OPS)
    modes: tuple[str, ...] = MODES


PRESETS: dict[str, Preset] = {
    # in-process (no clean CPU memory number), to check the plumbing in seconds
    "smoke": Preset(lengths=(32, 64), batch=1, width=128, dtype="float32", device="cpu", warmup=0, repeats=3,
                    max_seconds=10.0, isolate=False),
    "cpu": Preset(lengths=(512, 1024, 2048, 4096, 8192, 16384), batch=1, width=512, dtype="float32",
                  device="cpu", max_seconds=300.0),
    # the paper's setting (A100, batch 8, D 4096, head size 64, bf16); never run for these docs (no GPU)
    "gpu": Preset(lengths=(512, 1024, 2048, 4096, 8192, 16384), batch=8, width=4096, dtype="bfloat16",
                  device="cuda", warmup=2, repeats=5, max_seconds=60.0),
}


@dataclass
class Row:
    """One measured point. median_ms / peak_mib are NaN when the point was skipped (`note` says why).

    cpu_ms is the median CPU time of this process over the same runs. With one thread on a machine shared
    with other jobs it is the robust clock: it leaves out the time the scheduler gave to someone else."""

    op: str
    mode: str
    T: int
    median_ms: float
    peak_mib: float
    cpu_ms: float = math.nan
    note: str = ""
    times_ms: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- inputs


def make_inputs(op: str, B: int, T: int, D: int, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor]]:
    """The op as a function of named tensors, and those tensors with realistic values.

    Value ranges follow the models that call each op, so the numerics (and any data-dependent branch) are
    the ones a model meets: negative log decays, RWKV-7's a = -kk and b = kk * iclr with kk unit-norm per
    head (aviary/model/v7.py), Mamba's A = -(1..N) and dt in (0.001, 0.1) (its initialisation).
    Returns (fn, tensors); fn(**tensors) -> output tensor."""
    from aviary.experiments.baselines import selective_scan
    from aviary.ops import delta_rule, gla, wkv4
    from aviary.ops.wkv4 import empty_state

    g = torch.Generator().manual_seed(seed)
    H, K = D // HEAD_SIZE, HEAD_SIZE
    f32 = torch.float32

    def randn(*shape: int, scale: float = 1.0, dt: torch.dtype = f32) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt)

    if op == "rwkv4":
        ratio = torch.arange(D, dtype=f32) / (D - 1)
        tensors = {"w": -torch.exp(-5 + 8 * ratio ** 0.7).to(device),  # RWKV-4's decay init: -e^-5 .. -e^3
                   "u": torch.full((D,), math.log(0.3), device=device) + randn(D, scale=0.1),
                   "k": randn(B, T, D), "v": randn(B, T, D)}
        state = empty_state(B, D, device)

        def fn(w, u, k, v):
            return wkv4(w, u, k, v, state, backend="chunked")[0]
    elif op in ("rwkv5", "rwkv6"):
        base = torch.linspace(-6.0, -1.0, K)  # RWKV-6's w0 init range; logw = -e^(w0 + lora)
        if op == "rwkv5":
            logw = -torch.exp(base + torch.randn(1, 1, H, K, generator=g) * 0.3)
        else:
            logw = -torch.exp(base + torch.randn(B, T, H, K, generator=g) * 0.5)
        tensors = {"r": randn(B, T, H, K), "k": randn(B, T, H, K, scale=K ** -0.5), "v": randn(B, T, H, K),
                   "logw": logw.to(device), "u": randn(H, K, scale=0.5)}
        state = torch.zeros(B, H, K, K, device=device)

        def fn(r, k, v, logw, u):
            return gla(r, k, v, logw, u, state, backend="chunked")[0]
    elif op == "rwkv7":
        kk = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
        iclr = torch.sigmoid(torch.randn(B, T, H, K, generator=g))
        tensors = {"r": randn(B, T, H, K), "k": randn(B, T, H, K, scale=K ** -0.5), "v": randn(B, T, H, K),
                   "logw": (-math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, K, generator=g))).to(device),
                   "a": (-kk).to(device), "b": (kk * iclr).to(device)}
        state = torch.zeros(B, H, K, K, device=device)

        def fn(r, logw, k, v, a, b):
            return delta_rule(r, logw, k, v, a, b, state, backend="chunked")[0]
    elif op == "attention":
        tensors = {n: randn(B, H, T, K, dt=dtype) for n in "qkv"}

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif op == "mamba":
        Di, N = 2 * D, MAMBA_STATE
        dt = torch.exp(torch.rand(B, T, Di, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        tensors = {"x": randn(B, T, Di, dt=dtype), "dt": dt.to(device=device, dtype=dtype),
                   "A": -torch.arange(1, N + 1, dtype=f32).repeat(Di, 1).to(device=device, dtype=dtype),
                   "B": randn(B, T, N, dt=dtype), "C": randn(B, T, N, dt=dtype)}
        fn = selective_scan
    else:
        raise ValueError(f"unknown op {op!r}; choose one of {list(OPS)}")
    return fn, tensors


# ---------------------------------------------------------------- one point


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _vm_kib(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", status).group(1))


def _release_freed_memory() -> None:
    """glibc keeps freed heap blocks and raises its mmap threshold after big frees, so a later run could reuse
    memory that the RSS already counts. A fixed 64 KiB threshold sends every tensor-sized block to mmap, which
    is returned to the kernel on free; malloc_trim drops what the heap still holds."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def _cpu_peak_bytes(run_once: Callable[[], None]) -> float:
    """Growth of the resident-set high-water mark over the resident set just before `run_once`."""
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = _vm_kib("VmRSS")
    run_once()
    return 1024.0 * max(0, _vm_kib("VmHWM") - base)


def _cuda_peak_bytes(run_once: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_once()
    return float(torch.cuda.max_memory_allocated() - before)


def measure(op: str, T: int, mode: str, *, batch: int = 1, width: int = 512, device: str = "cpu",
            dtype: str = "float32", warmup: int = 1, repeats: int = 3, seed: int = 0) -> Row:
    """Time and peak memory of one (op, T, mode) point, in this process.

    The timed runs come first, with the allocator as it is; the memory run last, on its own: on CPU it sends
    every large block to mmap (see `_release_freed_memory`), which makes each allocation fault in fresh pages
    and would slow the allocation-heavy backward passes (by up to 3.5x in a first version of this sweep). The
    CPU number is only clean in a fresh process, where little was allocated before: `run` starts one per
    point. A point costs warmup + repeats + 1 runs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fn, tensors = make_inputs(op, batch, T, width, device=device, dtype=getattr(torch, dtype), seed=seed)
    if mode == "fwdbwd":
        for t in tensors.values():
            t.requires_grad_(True)
    # the output gradient is allocated up front, like the inputs: it is not the op's own memory
    with torch.no_grad():
        grad_out = torch.randn_like(fn(**tensors)) if mode == "fwdbwd" else None

    def run_once() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(**tensors)
        else:
            torch.autograd.backward(fn(**tensors), grad_out)
            for t in tensors.values():
                t.grad = None
        _sync(device)

    for _ in range(warmup):
        run_once()
    times, cpu_times = [], []
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        run_once()
        times.append(1e3 * (time.perf_counter() - start))
        cpu_times.append(1e3 * (time.process_time() - start_cpu))
    peak = (_cuda_peak_bytes if device.startswith("cuda") else _cpu_peak_bytes)(run_once)
    return Row(op, mode, T, statistics.median(times), peak / 2**20, cpu_ms=statistics.median(cpu_times),
               times_ms=times)


def _worker(spec: str) -> None:
    """Entry of the per-point subprocess: one `measure`, its Row as JSON on stdout."""
    from aviary.cpu.malloc import keep_freed_memory

    # without it, glibc maps and zero-fills every tensor above 32 MiB afresh on each call: at 16 k tokens the
    # kernel time of that (0.55 s) rivalled RWKV-7's arithmetic (0.7 s) and bent its slope (aviary.cpu.malloc)
    keep_freed_memory()
    kw = json.loads(spec)
    threads = kw.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    print(json.dumps(asdict(measure(**kw))), flush=True)


def _measure_point(op: str, T: int, mode: str, preset: Preset) -> Row:
    """`measure` in a fresh subprocess (`preset.isolate`), or here. A failed or timed-out point is a row
    with NaNs and a note, so one bad point does not lose the sweep."""
    spec = dict(op=op, T=T, mode=mode, batch=preset.batch, width=preset.width, device=preset.device,
                dtype=preset.dtype, warmup=preset.warmup, repeats=preset.repeats, threads=preset.threads)
    if not preset.isolate:
        threads = torch.get_num_threads()
        if preset.threads:
            torch.set_num_threads(preset.threads)
        try:
            return measure(**{k: v for k, v in spec.items() if k != "threads"})
        finally:
            torch.set_num_threads(threads)
    timeout = 3 * preset.max_seconds + 60
    cmd = [sys.executable, "-m", "aviary.experiments.speed", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row(op, mode, T, math.nan, math.nan, note=f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Row(op, mode, T, math.nan, math.nan, note=f"failed: {last[:200]}")
    return Row(**json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- the sweep


def _predicted_seconds(history: list[Row], T: int, preset: Preset) -> float:
    """Wall time of the next point: the last measured time extrapolated with the growth exponent of the last
    two points (1 to 2; 2 after only one point, to be safe), over the warm-up, timed and memory runs."""
    if not history:
        return 0.0
    last = history[-1]
    if not math.isfinite(last.median_ms):
        return math.inf
    exponent = 2.0
    if len(history) > 1 and math.isfinite(history[-2].median_ms) and history[-2].median_ms > 0:
        exponent = math.log(last.median_ms / history[-2].median_ms) / math.log(last.T / history[-2].T)
        exponent = min(2.0, max(1.0, exponent))
    return last.median_ms / 1e3 * (T / last.T) ** exponent * (preset.warmup + preset.repeats + 1)


def run(preset: Preset, *, log: Callable[[str], None] = print,
        on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Every (op, mode, T) point of `preset`, shortest lengths first (so a sweep cut short still has every op
    at the lengths it reached), each in a fresh subprocess when `preset.isolate`. A point predicted to take
    longer than `max_seconds` is skipped, and so are the longer ones of that op and mode.
    `on_row(rows so far)` is called after each point (the CLI rewrites its CSV there)."""
    rows: list[Row] = []
    history: dict[tuple[str, str], list[Row]] = {}
    for T in preset.lengths:
        for op in preset.ops:
            for mode in preset.modes:
                done = history.setdefault((op, mode), [])
                predicted = _predicted_seconds(done, T, preset)
                if predicted > preset.max_seconds:
                    note = f"skipped: predicted {predicted:.0f} s > --max-seconds {preset.max_seconds:g}"
                    row = Row(op, mode, T, math.nan, math.nan, note=note)
                else:
                    start = time.perf_counter()
                    row = _measure_point(op, T, mode, preset)
                    log(f"{op:9s} {mode:6s} T={T:6d}  {row.median_ms:10.2f} ms  (cpu {row.cpu_ms:10.2f} ms)  "
                        f"{row.peak_mib:9.1f} MiB  "
                        f"({time.perf_counter() - start:.0f} s) {row.note}")
                done.append(row)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def _ms(row: Row, clock: str) -> float:
    return row.cpu_ms if clock == "cpu" else row.median_ms


def slopes(rows: list[Row], lo: int = 2048, hi: int = 16384, clock: str = "wall") -> dict[tuple[str, str], float]:
    """Least-squares slope of log(time) against log(T) over the measured points with lo <= T <= hi, per
    (op, mode); clock "wall" (median_ms) or "cpu" (cpu_ms). A slope of 1 is linear in T, 2 quadratic.
    Pairs with fewer than two points are left out."""
    out = {}
    for key in sorted({(r.op, r.mode) for r in rows}):
        pts = [(math.log(r.T), math.log(_ms(r, clock))) for r in rows
               if (r.op, r.mode) == key and lo <= r.T <= hi and _ms(r, clock) > 0 and math.isfinite(_ms(r, clock))]
        if len(pts) < 2:
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        out[key] = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else math.nan
    return out


def crossings(rows: list[Row], peer: str = "attention", clock: str = "wall") -> dict[tuple[str, str], int | None]:
    """Per (op, mode): the first measured T from which `op` is faster than `peer` at every longer length
    measured for both (None if it is not faster at the longest). The shortest length means faster throughout."""
    times = {(r.op, r.mode, r.T): _ms(r, clock) for r in rows if math.isfinite(_ms(r, clock))}
    out: dict[tuple[str, str], int | None] = {}
    for op, mode in sorted({(r.op, r.mode) for r in rows if r.op != peer}):
        common = sorted(T for (o, m, T) in times if o == op and m == mode and (peer, mode, T) in times)
        faster = [times[op, mode, T] < times[peer, mode, T] for T in common]
        first = None
        for i in range(len(common) - 1, -1, -1):
            if not faster[i]:
                break
            first = common[i]
        out[op, mode] = first
    return out


# ---------------------------------------------------------------- output


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "mode", "T", "median_ms", "peak_mib", "cpu_ms", "note"])
        for r in rows:
            w.writerow([r.op, r.mode, r.T, f"{r.median_ms:.3f}", f"{r.peak_mib:.1f}", f"{r.cpu_ms:.3f}", r.note])


def read_csv(path: Path) -> list[Row]:
    with open(path, newline="") as f:
        return [Row(r["op"], r["mode"], int(r["T"]), float(r["median_ms"]), float(r["peak_mib"]),
                    float(r["cpu_ms"]), r["note"]) for r in csv.DictReader(f)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[Row], path: Path, *, title: str = "", memory_mode: str = "fwdbwd", clock: str = "wall") -> None:
    """Two panels in the Finch paper's layout: time against T (log-log; solid = forward+backward, dashed =
    forward; `clock` as in `slopes`) and peak memory against T (bars, one per op, for `memory_mode`)."""
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 5.2))
    ops = [op for op in OPS if any(r.op == op for r in rows)]
    colors = {op: f"C{i}" for i, op in enumerate(OPS)}
    for op in ops:
        for mode, style in (("fwdbwd", "-"), ("fwd", "--")):
            pts = sorted((r.T, _ms(r, clock)) for r in rows if r.op == op and r.mode == mode
                         and math.isfinite(_ms(r, clock)))
            if pts:
                ax_t.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=colors[op],
                          label=f"{OPS[op]}, {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("sequence length T")
    ax_t.set_ylabel(f"{'CPU' if clock == 'cpu' else 'wall'} time (ms, median)")
    ax_t.set_title("time-mix op: time vs T (solid fwd+bwd, dashed fwd)")
    ax_t.legend(fontsize=6.5)
    lengths = sorted({r.T for r in rows})
    width = 0.8 / max(1, len(ops))
    for i, op in enumerate(ops):
        mem = {r.T: r.peak_mib for r in rows if r.op == op and r.mode == memory_mode}
        xs = [j + (i - (len(ops) - 1) / 2) * width for j in range(len(lengths))]
        ax_m.bar(xs, [mem.get(T, math.nan) for T in lengths], width, color=colors[op], label=OPS[op])
    ax_m.set_xticks(range(len(lengths)), [f"{T // 1024}k" if T >= 1024 else str(T) for T in lengths])
    ax_m.set_yscale("log")
    top = max((r.peak_mib for r in rows if r.mode == memory_mode and math.isfinite(r.peak_mib)), default=1.0)
    ax_m.set_ylim(top=max(top, 1.0) * 40)  # headroom for the legend above the bars
    ax_m.set_xlabel("sequence length T")
    ax_m.set_ylabel("peak memory over inputs (MiB)")
    ax_m.set_title(f"peak memory, {'fwd+bwd' if memory_mode == 'fwdbwd' else 'fwd'} (missing bar = skipped)")
    ax_m.legend(fontsize=6.5, ncol=2, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode_latency(results_json: Path, path: Path) -> None:
    """Whole-model per-token decode latency against context length, RWKV (state) vs GPT-2 (KV cache), from
    the "context" part of benchmarks/bench_inference.py's saved JSON (its `bench_context`)."""
    results = json.loads(Path(results_json).read_text())
    ctx = results["context"]
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, ms in ctx["ms"].items():
        ax_t.plot(ctx["contexts"], ms, marker="o", label=name)
        ax_m.plot(ctx["contexts"], [b / 2**20 for b in ctx["state_bytes"][name]], marker="o", label=name)
    for ax, ylabel, subtitle in ((ax_t, "ms / token (median)", "per-token decode latency"),
                                 (ax_m, "MiB", "recurrent state vs KV cache (fp32)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context already processed (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle)
        ax.legend(fontsize=8)
    machine = results.get("machine", {})
    fig.suptitle(f"whole model L12-D768, single stream, {machine.get('threads', '?')} CPU threads "
                 f"(benchmarks/bench_inference.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[Row]) -> dict:
    """Slopes (2k-16k) and crossings against attention by both clocks, in a JSON-able form."""
    out = {}
    for clock in ("wall", "cpu"):
        out[f"slopes_2k_16k_{clock}"] = {f"{op}/{mode}": round(s, 3)
                                         for (op, mode), s in slopes(rows, clock=clock).items()}
        out[f"faster_than_attention_from_T_{clock}"] = {f"{op}/{mode}": T for (op, mode), T
                                                        in crossings(rows, clock=clock).items()}
    return out


# ---------------------------------------------------------------- command line


DESCRIPTION = ("Time and peak memory of the time-mix op (RWKV-4/5/6/7 chunked, causal SDPA, Mamba's selective scan "
               "in PyTorch) against sequence length, forward and forward+backward. Writes NAME.csv, NAME.png and "
               "NAME.json (slopes and crossings) into --out-dir.")
EPILOG = ("Presets: smoke (tiny, seconds), cpu (B 1, D 512, fp32, T 512..16k), gpu (the Finch paper's B 8, D 4096, "
          "bf16 on CUDA). Options below override the preset.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aviary.experiments.speed", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the files go (default: .)")
    p.add_argument("--name", default="evaluation_speed", help="file basename (default: evaluation_speed)")
    p.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--modes", help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--lengths", help="comma-separated sequence lengths, e.g. 512,2048,8192")
    p.add_argument("--batch", type=int)
    p.add_argument("--width", type=int, help="model dimension D (heads = D / 64)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--dtype", help="dtype of attention and Mamba inputs (RWKV ops always run float32)")
    p.add_argument("--repeats", type=int, help="timed runs per point (median reported; >= 3)")
    p.add_argument("--max-seconds", type=float, help="per-point time budget; longer points are skipped")
    p.add_argument("--threads", type=int, help="torch CPU threads per point (0 = torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time axis of the figure and the printed slopes: wall (default) or the process's CPU "
                        "time (robust on a shared machine with --threads 1); the CSV and JSON have both")
    p.add_argument("--decode-results", type=Path,
                   help="also plot whole-model decode latency vs context from this bench_inference.py JSON "
                        "into OUT_DIR/evaluation_decode_latency.png")
    p.add_argument("--from-csv", type=Path,
                   help="measure nothing: redraw the figure and recompute slopes from this CSV (e.g. of a sweep "
                        "that was cut short)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one point in a fresh process


def _preset_from_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Preset:
    preset = PRESETS[args.preset]
    over = {"batch": args.batch, "width": args.width, "device": args.device, "dtype": args.dtype,
            "repeats": args.repeats, "max_seconds": args.max_seconds, "threads": args.threads,
            "ops": tuple(args.ops.split(",")) if args.ops else None,
            "modes": tuple(args.modes.split(",")) if args.modes else None,
            "lengths": tuple(int(t) for t in args.lengths.split(",")) if args.lengths else None}
    preset = replace(preset, **{k: v for k, v in over.items() if v is not None})
    unknown = set(preset.ops) - set(OPS) | set(preset.modes) - set(MODES)
    if unknown:
        ap.error(f"unknown ops or modes: {sorted(unknown)} (ops: {', '.join(OPS)}; modes: {', '.join(MODES)})")
    if preset.width % HEAD_SIZE or preset.width < 1:
        ap.error(f"--width must be a positive multiple of {HEAD_SIZE}, got {preset.width}")
    if preset.batch < 1 or preset.repeats < 1 or any(t < 1 for t in preset.lengths):
        ap.error("--batch, --repeats and --lengths must be positive")
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {preset.device}: this machine has no CUDA device")
    return preset


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    run_command(ap.parse_args(argv), ap)


def run_command(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Measure (or redraw, --from-csv) what the parsed options describe (`ap` reports bad options)."""
    if args.worker:
        _worker(args.worker)
        return
    if args.from_csv and not args.from_csv.is_file():
        ap.error(f"--from-csv: no such file: {args.from_csv}")
    preset = _preset_from_args(args, ap)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = args.out_dir / args.name
    if args.from_csv:
        rows = read_csv(args.from_csv)
        if args.from_csv.resolve() != base.with_suffix(".csv").resolve():
            write_csv(rows, base.with_suffix(".csv"))
    else:
        rows = run(preset, on_row=lambda so_far: write_csv(so_far, base.with_suffix(".csv")))
    info = summary(rows)
    plot(rows, base.with_suffix(".png"), clock=args.clock, title=f"time-mix op, B {preset.batch}, D {preset.width} "
         f"({preset.width // HEAD_SIZE} heads of 64), {preset.device}, threads: {preset.threads or 'default'}")
    meta = {"preset": args.preset, "settings": asdict(preset), "torch": torch.__version__,
            "elapsed_s": None if args.from_csv else round(time.perf_counter() - start, 1),
            "from_csv": str(args.from_csv) if args.from_csv else None, **info}
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    for key, value in info[f"slopes_2k_16k_{args.clock}"].items():
        print(f"slope 2k-16k ({args.clock} time) {key:18s} {value:.2f}")
    for key, value in info[f"faster_than_attention_from_T_{args.clock}"].items():
        print(f"faster than attention ({args.clock} time) {key:18s} from T={value}")
    if args.decode_results:
        plot_decode_latency(args.decode_results, args.out_dir / "evaluation_decode_latency.png")


if __name__ == "__main__":
    main()
