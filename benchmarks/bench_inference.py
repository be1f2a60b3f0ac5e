"""Inference speed and precision of Aviary against the `rwkv` pip package and a GPT-2-sized Transformer.

    python benchmarks/bench_inference.py                     # full run (~20 min on 2 busy cores)
    python benchmarks/bench_inference.py --quick             # fewer repeats, shorter contexts (smoke test)

Same random-weight L12-D768-V65536 checkpoints (official format, `aviary.testing`) for RWKV-6 and RWKV-7
(`--versions 4,5` for the older two),
`torch.set_num_threads(2)` everywhere. Each engine (Aviary fp32 / bf16 / int8, the pip package `cpu fp32` /
`cpu bf16`, GPT-2 with a KV cache) lives in its own worker process (the pip package configures itself from
env vars at import, and RWKV-7 cannot share a process with RWKV-4/5/6). The parent sends the workers the
same task in turn, round after round, so that every engine sees the same machine load; it reports
medians over rounds and the ratio to the peer measured in the same rounds.

Tasks: single-stream decode (ms/token), prefill of 512 tokens, batch-16 decode (Aviary), per-token decode
at context 128 / 1k / 4k / 16k (RWKV vs GPT-2, with state / KV-cache bytes), and the logit error of
bf16 / int8 against fp32. Writes JSON (benchmarks/results/inference.json) and a PNG plot
(docs/benchmarks_inference.png, needs matplotlib: `pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
L, D, V = 12, 768, 65536
CONTEXTS = (128, 1024, 4096, 16384)
# Idle OpenMP threads sleep instead of spinning. On this 2-core machine shared with other jobs, spinning
# workers take the core the next op needs: one RWKV-7 fp32 decode step measured 950 ms with the default
# policy and 72 ms with PASSIVE (58 ms on 1 thread). It applies to every engine alike (all are torch).
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


# ---- workers --------------------------------------------------------------------------------------------

class AviaryEngine:
    def __init__(self, path: str, dtype: str, quantize: str | None, use_kernels: bool = True):
        import aviary
        from aviary.kernels import reference_only

        self.model = aviary.load(path, dtype=dtype, quantize=quantize)
        if not use_kernels:  # this worker process runs torch's kernels only, for the whole run
            self._reference = reference_only()
            self._reference.__enter__()

    def step(self, tokens, state):  # tokens [B, T] -> (logits of the last position [B, V], state)
        # a state that the loop owns is updated in place, as the pip package and Aviary's Engine do
        logits, state = self.model(tokens, state, last_only=True, inplace=state is not None)
        return logits[:, -1], state

    def weight_bytes_per_token(self) -> int:
        """Bytes of parameters a one-token step reads: everything except the embedding, plus one of its rows."""
        m = self.model
        total = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
        emb = m.emb.weight
        return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()

    def state_bytes(self) -> int:
        return self.model.init_state(1).nbytes


class PipEngine:
    def __init__(self, path: str, strategy: str, version: int):
        from rwkv.model import RWKV  # env already set by the parent

        self.model = RWKV(model=path.removesuffix(".pth"), strategy=strategy,
                          **({} if version == 7 else {"verbose": False}))

    def step(self, tokens, state):  # B = 1 only; the pip package mutates state, so callers never reuse it
        logits, state = self.model.forward(tokens[0].tolist(), state)
        return logits[None].float(), state


class GPT2Engine:
    def __init__(self, n_positions: int):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.config = GPT2Config(n_positions=n_positions)  # defaults otherwise: L12, D768, V50257
        self.model = GPT2LMHeadModel(self.config).eval()

    def cache(self, length: int):
        """A KV cache of `length` random entries: the cost of a decode step depends on its size, not its values."""
        import torch
        from transformers import DynamicCache

        c = self.config
        cache = DynamicCache()
        g = torch.Generator().manual_seed(0)
        for i in range(c.n_layer):
            shape = (1, c.n_head, length, c.n_embd // c.n_head)
            cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), i)
        return cache

    def step_at(self, token: int, cache, position: int):
        import torch

        out = self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                         position_ids=torch.tensor([[position]]))
        return out.logits[:, -1], out.past_key_values


def _timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def worker_main(spec: dict) -> None:
    """Serve tasks from stdin (one JSON per line), answer one JSON per line on stdout."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    kind = spec["kind"]
    out = sys.stdout
    sys.stdout = sys.stderr  # the pip package prints at import, while loading and while running
    if kind == "aviary":
        eng = AviaryEngine(spec["path"], spec["dtype"], spec.get("quantize"), spec.get("kernels", True))
    elif kind == "pip":
        eng = PipEngine(spec["path"], spec["strategy"], spec["version"])
    else:
        eng = GPT2Engine(spec["n_positions"])
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    g = torch.Generator().manual_seed(1)
    state = None
    for line in sys.stdin:
        task = json.loads(line)
        name = task["task"]
        if kind == "aviary":  # int8: the default kernel, or for the error the dequantised reference (F.linear)
            from aviary.quant import default_kernel

            for m in eng.model.modules():
                if hasattr(m, "kernel"):
                    m.kernel = None if task.get("reference", False) else default_kernel()
        with torch.inference_mode():
            if name == "decode":  # continue one stream; the first call builds a state from a short prompt
                if state is None:
                    _, state = eng.step(torch.randint(0, V, (1, 16), generator=g), None)
                tok = torch.randint(0, V, (1, 1), generator=g)
                box = {"s": state}

                def one(box=box, tok=tok):
                    box["s"] = eng.step(tok, box["s"])[1]

                res = {"times": _timed(one, task["n"])}
                state = box["s"]
            elif name == "prefill":
                toks = torch.randint(0, V, (1, task["T"]), generator=g)
                res = {"times": _timed(lambda toks=toks: eng.step(toks, None), task["n"])}
            elif name == "batch":
                B = task["B"]
                _, bstate = eng.step(torch.randint(0, V, (B, 16), generator=g), None)
                tok = torch.randint(0, V, (B, 1), generator=g)
                box = {"s": bstate}

                def one(box=box, tok=tok):
                    box["s"] = eng.step(tok, box["s"])[1]

                res = {"times": _timed(one, task["n"])}
            elif name == "context":  # per-token decode with a context of `length` tokens behind it
                length = task["length"]
                if kind == "gpt2":
                    cache = eng.cache(length)
                    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers
                                 for t in (layer.keys, layer.values))
                    box = {"c": cache, "p": length}

                    def one(box=box):
                        box["c"] = eng.step_at(5, box["c"], box["p"])[1]
                        box["p"] += 1
                else:
                    # An RWKV step reads a state of fixed size whatever the context: a state after a
                    # 16-token prompt has the same shape and cost as one after `length` tokens.
                    _, cstate = eng.step(torch.randint(0, V, (1, 16), generator=g), None)
                    nbytes = cstate.nbytes
                    box = {"s": cstate}

                    def one(box=box):
                        box["s"] = eng.step(torch.tensor([[5]]), box["s"])[1]

                one()
                res = {"times": _timed(one, task["n"]), "state_bytes": nbytes}
            elif name == "logits":  # logits at every position of a fixed sequence (for the error)
                toks = torch.tensor(task["tokens"])[None]
                st, outs = None, []
                for t in range(toks.shape[1]):  # one token at a time: the decode path, as served
                    lg, st = eng.step(toks[:, t:t + 1], st)
                    outs.append(lg.float())
                path = task["out"]
                torch.save(torch.cat(outs), path)
                res = {"path": path}
            elif name == "info":
                res = {"weight_bytes": eng.weight_bytes_per_token() if kind == "aviary" else None,
                       "state_bytes": eng.state_bytes() if kind == "aviary" else None}
            elif name == "profile":
                res = {"table": profile_decode(eng, g)}
            else:
                res = {"error": f"unknown task {name}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


def profile_decode(eng, g) -> str:
    """Where a decode step's time goes, by op (torch.profiler), as a text table."""
    import torch
    from torch.profiler import profile

    _, state = eng.step(torch.randint(0, V, (1, 16), generator=g), None)
    tok = torch.tensor([[5]])
    with profile() as prof:
        for _ in range(10):
            _, state = eng.step(tok, state)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


class Worker:
    def __init__(self, name: str, spec: dict, env: dict | None = None):
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY=OMP_WAIT_POLICY, **(env or {}))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (see its stderr above)")
        return json.loads(line)

    def ask(self, **task) -> dict:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def pip_env(version: int) -> dict:
    return {"RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "1" if version == 7 else "0"}


# ---- the parent -----------------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs)


def rounds(workers: dict[str, Worker], task: dict, n_rounds: int, per_round) -> dict[str, list[float]]:
    """Run `task` on every worker in turn, `n_rounds` times; collect per_round(result) from each."""
    out: dict[str, list[float]] = {k: [] for k in workers}
    for _ in range(n_rounds):
        for k, w in workers.items():
            out[k].append(per_round(w.ask(**task)))
    return out


def copy_bandwidth() -> float:
    """Bytes moved per second by a large tensor copy (read + write), best of several, in GB/s."""
    import torch

    torch.set_num_threads(THREADS)
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src), 10))
    return 2 * src.numel() * 4 / best / 1e9


def error_stats(x, ref) -> dict:
    d = (x - ref).float()
    return {"max_abs": float(d.abs().max()), "rms": float(d.pow(2).mean().sqrt()),
            "rel_rms": float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
            "top1_agree": float((x.argmax(-1) == ref.argmax(-1)).float().mean()),
            "logit_rms": float(ref.pow(2).mean().sqrt()), "n_positions": int(ref.shape[0]),
            "first_max_abs": float(d[0].abs().max()),
            "first_rel_rms": float(d[0].pow(2).mean().sqrt() / ref[0].pow(2).mean().sqrt())}


TORCH_ONLY = "aviary fp32 torch-only"  # the same model with Aviary's C kernels off (kernels.reference_only)


def bench_version(version: int, path: str, args, tmp: str) -> dict:
    import torch

    specs = {
        "aviary fp32": {"kind": "aviary", "path": path, "dtype": "float32"},
        TORCH_ONLY: {"kind": "aviary", "path": path, "dtype": "float32", "kernels": False},
        "aviary bf16": {"kind": "aviary", "path": path, "dtype": "bfloat16"},
        "aviary int8": {"kind": "aviary", "path": path, "dtype": "float32", "quantize": "int8"},
        "pip cpu fp32": {"kind": "pip", "path": path, "strategy": "cpu fp32", "version": version},
        "pip cpu bf16": {"kind": "pip", "path": path, "strategy": "cpu bf16", "version": version},
    }
    if version != 7:  # the pip package has no int8 for RWKV-7
        specs["pip cpu fp32i8"] = {"kind": "pip", "path": path, "strategy": "cpu fp32i8", "version": version}
    t0 = time.perf_counter()
    workers = {k: Worker(k, s, pip_env(version) if s["kind"] == "pip" else None) for k, s in specs.items()}
    for w in workers.values():  # all load at once; wait for each to say it is ready
        w._read()
    print(f"  RWKV-{version}: {len(workers)} workers loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    R = args.rounds
    try:
        res: dict = {"info": workers["aviary fp32"].ask(task="info")}
        res["info_int8"] = workers["aviary int8"].ask(task="info")
        res["info_bf16"] = workers["aviary bf16"].ask(task="info")
        print(f"  RWKV-{version}: decode ({time.perf_counter() - t0:.0f} s)", flush=True)
        timed = {k: w for k, w in workers.items() if "i8" not in k or k.startswith("aviary")}  # pip i8: error only
        dec = rounds(timed, {"task": "decode", "n": args.steps}, R, lambda r: median(r["times"]))
        res["decode_ms"] = {k: 1e3 * median(v) for k, v in dec.items()}
        res["decode_ratio_vs_pip_fp32"] = {k: median([p / a for p, a in zip(dec["pip cpu fp32"], v, strict=True)])
                                           for k, v in dec.items()}
        res["decode_ratio_vs_pip_bf16"] = {k: median([p / a for p, a in zip(dec["pip cpu bf16"], v, strict=True)])
                                           for k, v in dec.items()}
        if args.profile:
            res["profile_fp32"] = workers["aviary fp32"].ask(task="profile")["table"]
            res["profile_int8"] = workers["aviary int8"].ask(task="profile")["table"]
        if args.tasks == "decode":
            return res
        timed.pop(TORCH_ONLY)
        print(f"  RWKV-{version}: prefill {args.prefill} ({time.perf_counter() - t0:.0f} s)", flush=True)
        pre = rounds(timed, {"task": "prefill", "T": args.prefill, "n": 1}, max(2, R // 2),
                     lambda r: min(r["times"]))
        res["prefill_s"] = {k: median(v) for k, v in pre.items()}
        res["prefill_ratio_vs_pip"] = {
            k: median([p / a for p, a in zip(pre["pip cpu " + ("bf16" if "bf16" in k else "fp32")], v, strict=True)])
            for k, v in pre.items() if k.startswith("aviary")}
        print(f"  RWKV-{version}: batch {args.batch} ({time.perf_counter() - t0:.0f} s)", flush=True)
        av = {k: w for k, w in workers.items() if k.startswith("aviary") and k != TORCH_ONLY}
        bat = {k: [] for k in av}
        single = {k: [] for k in av}
        for _ in range(R):  # batch and single stream measured back to back, per engine
            for k, w in av.items():
                bat[k].append(median(w.ask(task="batch", B=args.batch, n=args.steps)["times"]))
                single[k].append(median(w.ask(task="decode", n=args.steps)["times"]))
        res["batch_ms_per_step"] = {k: 1e3 * median(v) for k, v in bat.items()}
        res["batch_speedup_vs_single"] = {k: median([args.batch * s / b for s, b in zip(single[k], v, strict=True)])
                                          for k, v in bat.items()}
        print(f"  RWKV-{version}: logit error ({time.perf_counter() - t0:.0f} s)", flush=True)
        toks = torch.randint(0, V, (args.error_tokens,), generator=torch.Generator().manual_seed(7)).tolist()
        logits = {}
        for k, w in workers.items():
            if k == TORCH_ONLY:
                continue
            p = w.ask(task="logits", tokens=toks, out=os.path.join(tmp, f"v{version}-{k.replace(' ', '_')}.pt"))
            logits[k] = torch.load(p["path"])
        p = workers["aviary int8"].ask(task="logits", tokens=toks, reference=True,
                                       out=os.path.join(tmp, f"v{version}-int8-ref.pt"))
        logits["aviary int8 (dequantised reference)"] = torch.load(p["path"])
        res["error_vs_own_fp32"] = {}
        for k, lg in logits.items():
            ref = logits["aviary fp32" if k.startswith("aviary") else "pip cpu fp32"]
            res["error_vs_own_fp32"][k] = error_stats(lg, ref)
        res["aviary_fp32_vs_pip_fp32"] = error_stats(logits["aviary fp32"], logits["pip cpu fp32"])
    finally:
        for w in workers.values():
            w.close()
    return res


def bench_context(paths: dict[int, str], args) -> dict:
    contexts = CONTEXTS[:2] if args.quick else CONTEXTS
    workers = {f"aviary fp32 RWKV-{v}": Worker(f"v{v}", {"kind": "aviary", "path": p, "dtype": "float32"})
               for v, p in paths.items()}
    workers["GPT-2 (KV cache)"] = Worker("gpt2", {"kind": "gpt2", "n_positions": max(contexts) + 64})
    for w in workers.values():
        w._read()
    out: dict = {"contexts": list(contexts), "ms": {k: [] for k in workers}, "state_bytes": {k: [] for k in workers}}
    try:
        for length in contexts:
            print(f"  context {length}", flush=True)
            per = {k: [] for k in workers}
            for _ in range(max(2, args.rounds // 2)):
                for k, w in workers.items():
                    r = w.ask(task="context", length=length, n=args.steps)
                    per[k].append(median(r["times"]))
                    nbytes = r["state_bytes"]
            for k in workers:
                out["ms"][k].append(1e3 * median(per[k]))
            for k, w in workers.items():
                out["state_bytes"][k].append(w.ask(task="context", length=length, n=1)["state_bytes"])
            del nbytes
    finally:
        for w in workers.values():
            w.close()
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]): no plot")
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    engines = ["pip cpu fp32", "pip cpu bf16", "aviary fp32", "aviary bf16", "aviary int8"]
    width = 0.38
    for j, v in enumerate((6, 7)):
        r = results.get(f"rwkv{v}")
        if not r:
            continue
        tps = [1e3 / r["decode_ms"][e] for e in engines]
        xs = [i + (j - 0.5) * width for i in range(len(engines))]
        ax1.bar(xs, tps, width, label=f"RWKV-{v}")
    ax1.set_xticks(range(len(engines)), [e.replace("cpu ", "") for e in engines], rotation=20)
    ax1.set_ylabel("tokens / s (single stream)")
    ax1.set_title("decode, L12-D768-V65536, 2 threads")
    ax1.legend()
    ctx = results.get("context", {"ms": {}, "contexts": [], "state_bytes": {}})
    for k, ms in ctx["ms"].items():
        ax2.plot(ctx["contexts"], ms, marker="o", label=k)
        ax3.plot(ctx["contexts"], [b / 2**20 for b in ctx["state_bytes"][k]], marker="o", label=k)
    for ax, title, ylabel in ((ax2, "per-token decode vs context", "ms / token"),
                              (ax3, "state vs KV cache (fp32)", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax3.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def table(results: dict) -> str:
    """Markdown tables of the results."""
    lines = []
    bw = results["copy_bandwidth_gbs"]
    for v in (4, 5, 6, 7):
        r = results.get(f"rwkv{v}")
        if not r:
            continue
        wb = {"aviary fp32": r["info"]["weight_bytes"], "aviary bf16": r["info_bf16"]["weight_bytes"],
              "aviary int8": r["info_int8"]["weight_bytes"]}
        lines += [f"\n**RWKV-{v}** (L{L}-D{D}-V{V}, random weights), single-stream decode, median of rounds\n",
                  "| engine | ms/token | tokens/s | × pip fp32 | × pip bf16 | weight bytes/token | bandwidth bound "
                  "ms/token | % of bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, ms in r["decode_ms"].items():
            b = wb.get(k)
            bound = 1e3 * b / (bw * 1e9) if b else None
            lines.append(f"| {k} | {ms:.1f} | {1e3 / ms:.1f} | {r['decode_ratio_vs_pip_fp32'][k]:.2f} | "
                         f"{r['decode_ratio_vs_pip_bf16'][k]:.2f} | "
                         + (f"{b / 1e6:.0f} MB | {bound:.1f} | {100 * bound / ms:.0f} % |" if b else "| | |"))
        if "prefill_s" not in r:
            continue
        lines += ["", f"Prefill of {results['args']['prefill']} tokens (one call, fresh state):", "",
                  "| engine | seconds | tokens/s | × pip same dtype |", "|---|---|---|---|"]
        for k, s in r["prefill_s"].items():
            ratio = r["prefill_ratio_vs_pip"].get(k)
            lines.append(f"| {k} | {s:.2f} | {results['args']['prefill'] / s:.0f} | "
                         + (f"{ratio:.2f} |" if ratio else " |"))
        lines += ["", f"Batch-{results['args']['batch']} decode (Aviary):", "",
                  "| engine | ms/step | aggregate tokens/s | × single stream |", "|---|---|---|---|"]
        for k, ms in r["batch_ms_per_step"].items():
            lines.append(f"| {k} | {ms:.1f} | {results['args']['batch'] * 1e3 / ms:.0f} | "
                         f"{r['batch_speedup_vs_single'][k]:.1f} |")
        lines += ["", f"Logit error against the same implementation's fp32 ({results['args']['error_tokens']} "
                      "positions, token by token; logits RMS "
                      f"{r['error_vs_own_fp32']['aviary fp32']['logit_rms']:.2f}):", "",
                  "| engine | max abs | RMS / logit RMS | top-1 agreement | first position: max abs | "
                  "first position: RMS / logit RMS |", "|---|---|---|---|---|---|"]
        for k, e in r["error_vs_own_fp32"].items():
            if k in ("aviary fp32", "pip cpu fp32"):
                continue
            lines.append(f"| {k} | {e['max_abs']:.3f} | {100 * e['rel_rms']:.2f} % | {100 * e['top1_agree']:.1f} % | "
                         f"{e['first_max_abs']:.3f} | {100 * e['first_rel_rms']:.2f} % |")
        e = r["aviary_fp32_vs_pip_fp32"]
        lines.append(f"| aviary fp32 vs pip fp32 | {e['max_abs']:.2e} | {100 * e['rel_rms']:.3f} % | "
                     f"{100 * e['top1_agree']:.1f} % | {e['first_max_abs']:.1e} | {100 * e['first_rel_rms']:.4f} % |")
    ctx = results.get("context")
    if not ctx:
        return "\n".join(lines)
    lines += ["", "Per-token decode at a given context length (fp32; ms/token, and state or KV-cache MiB):", "",
              "| engine | " + " | ".join(str(c) for c in ctx["contexts"]) + " |",
              "|---|" + "---|" * len(ctx["contexts"])]
    for k, ms in ctx["ms"].items():
        lines.append(f"| {k} ms | " + " | ".join(f"{m:.1f}" for m in ms) + " |")
    for k, b in ctx["state_bytes"].items():
        lines.append(f"| {k} MiB | " + " | ".join(f"{x / 2**20:.2f}" for x in b) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, short contexts: a smoke test")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="decode steps timed per round")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--error-tokens", type=int, default=64)
    ap.add_argument("--versions", default="6,7", help="comma-separated RWKV versions, any of 4,5,6,7 (the "
                    "issue's tables are 6 and 7; the plot shows 6 and 7)")
    ap.add_argument("--tasks", default="all", help="'decode': single-stream decode only; 'all': everything")
    ap.add_argument("--profile", action="store_true", help="also profile one decode step by op")
    ap.add_argument("--workdir", help="keep the random checkpoints here (re-used when present)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "benchmarks_inference.png"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.prefill, args.error_tokens = 2, 2, 64, 8

    import torch

    from aviary.testing import random_config, save_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = {}
        for v in (int(x) for x in args.versions.split(",")):
            paths[v] = str(work / f"rwkv{v}-L{L}-D{D}-V{V}.pth")
            if not os.path.exists(paths[v]):
                print(f"writing {paths[v]}", flush=True)
                save_random_checkpoint(paths[v], random_config(v, n_layer=L, n_embd=D, vocab_size=V))
        results: dict = {"args": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                         "threads": THREADS, "torch": torch.__version__,
                                                         "cores": os.cpu_count()},
                         "copy_bandwidth_gbs": copy_bandwidth()}
        print(f"copy bandwidth {results['copy_bandwidth_gbs']:.1f} GB/s (read + write)", flush=True)
        results["machine"]["omp_wait_policy"] = OMP_WAIT_POLICY
        for v, p in paths.items():
            results[f"rwkv{v}"] = bench_version(v, p, args, tmp)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))  # partial results as they come
        if args.tasks == "all":
            print("context sweep", flush=True)
            results["context"] = bench_context(paths, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    for v in (4, 5, 6, 7):
        for key in ("profile_fp32", "profile_int8"):
            if key in results.get(f"rwkv{v}", {}):
                print(f"\nRWKV-{v} {key}\n{results[f'rwkv{v}'][key]}")
    if "context" in results and plot(results, Path(args.png)):
        print(f"plot: {args.png}")
    print(f"json: {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
