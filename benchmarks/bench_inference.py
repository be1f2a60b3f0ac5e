"""Inference speed and precision of Aviary against the `rwkv` pip package, llama.cpp and a GPT-2-sized Transformer.

    python benchmarks/bench_inference.py                     # full run (~20-25 min on 2 busy cores)
    python benchmarks/bench_inference.py --quick             # fewer repeats, shorter contexts (smoke test)
    python benchmarks/bench_inference.py --isa avx2          # Aviary's workers on the AVX2 kernels
    python benchmarks/bench_inference.py --no-llama-cpp      # without llama.cpp even where it is installed
    python benchmarks/bench_inference.py --workdir DIR       # keep the checkpoints and GGUF files for next time

Same random-weight L12-D768-V65536 checkpoints (official format, `aviary.testing`) for RWKV-6 and RWKV-7
(`--versions 4,5` for the older two),
`torch.set_num_threads(2)` everywhere. Each engine (Aviary fp32 / bf16 / int8, Aviary fp32 on other instruction
sets (`--extra-isas`, default the portable C "generic" path) and on torch alone, the pip package `cpu fp32` /
`cpu bf16`, llama.cpp f32 / q8_0, GPT-2 with a KV cache) lives in its own worker process (the pip package
configures itself from env vars at import, RWKV-7 cannot share a process with RWKV-4/5/6, and each Aviary worker
gets its instruction set from AVIARY_CPU_ISA, read at import). The parent sends the workers the same task in
turn, round after round, so that every engine sees the same machine load; it reports medians over rounds and
the ratio to the peer measured in the same rounds.

`--isa NAME` sets AVIARY_CPU_ISA=NAME for every Aviary worker (default: as in this environment; unset is the
best this CPU runs). Each Aviary worker reports its decode path (`model.decode_path`) once loaded; the JSON
keeps it with `aviary.cpu.backend_info()` of the parent.

Peers are optional: when the `rwkv` package, `transformers` (GPT-2) or llama.cpp (`llama-cpp-python`) is
missing or fails, the run prints "skipped <peer>: <reason>", goes on, and the JSON says which were skipped
("skipped"). llama.cpp (RWKV-6/7): the checkpoint goes through `aviary convert` and llama.cpp's own
convert_hf_to_gguf.py to f32 and q8_0 GGUF files (benchmarks/llamacpp_peer.py); "llama.cpp f32" is compared
with Aviary fp32 and "llama.cpp q8_0" with Aviary int8, single-stream decode only, and their logits with
Aviary's on a short prompt ("llamacpp_check").

Tasks: single-stream decode (ms/token), prefill of 512 tokens, batch-16 decode (Aviary), per-token decode
at context 128 / 1k / 4k / 16k (RWKV vs GPT-2, with state / KV-cache bytes), and the logit error of
bf16 / int8 against fp32. Writes JSON (benchmarks/results/inference.json, rewritten after every stage so a
crash late loses little) and a PNG plot (docs/benchmarks_inference.png, needs matplotlib:
`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_peer  # noqa: E402
from _common import ISA_ENV, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
L, D, V = 12, 768, 65536
CONTEXTS = (128, 1024, 4096, 16384)
# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning workers take
# the core the next op needs (docs/benchmarks.md, Design measurements item 1). It applies to every engine
# alike (all are torch).
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
# Not for llama.cpp: ggml synchronises its threads with an OpenMP barrier after every op of the graph, and
# PASSIVE puts them to sleep at each one, which makes it several times slower (docs/benchmarks.md, Design
# measurements item 2). Its workers run with the variable unset, as llama.cpp's own tools do, unless
# --llama-omp-wait-policy says otherwise.
ISAS = ("avx512", "avx2", "generic", "torch")  # aviary.cpu.ISAS (not imported before AVIARY_CPU_ISA is set)

TORCH_ONLY = "aviary fp32 torch-only"  # the same model with no C kernels (AVIARY_CPU_ISA=torch)
LLAMA = {"f32": "llama.cpp f32", "q8_0": "llama.cpp q8_0"}  # GGUF outtype -> engine
LLAMA_PAIRS = {"llama.cpp f32": "aviary fp32", "llama.cpp q8_0": "aviary int8"}  # same weight precision
PEER_OF_KIND = {"pip": "rwkv", "gpt2": "transformers", "llama.cpp": "llama.cpp", "aviary": None}
PEER_MODULES = {"rwkv": ("rwkv", "rwkv==0.8.32"), "transformers": ("transformers", "transformers")}
CHECK_PROMPT = "The quick brown fox jumps over the lazy dog. 1 + 1 = 2; 北京 is a city."


def isa_engine(isa: str) -> str:
    """The name of the Aviary fp32 engine pinned to another instruction set."""
    return TORCH_ONLY if isa == "torch" else f"aviary fp32 {isa}"


# ---- optional peers ---------------------------------------------------------------------------------------

def missing_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[module] is None
        return True


def missing_peer(peer: str) -> str | None:
    """Why `peer` ("rwkv", "transformers" or "llama.cpp") cannot run here, or None."""
    if peer == "llama.cpp":
        return llamacpp_peer.missing()
    module, package = PEER_MODULES[peer]
    return f"No module named '{module}' (pip install {package})" if missing_module(module) else None


def skip(skipped: dict, peer: str, reason: str) -> None:
    """Record that `peer` (a package, or one engine) is left out, and say so once."""
    if peer not in skipped:
        print(f"skipped {peer}: {reason}", flush=True)
        skipped[peer] = reason


# ---- workers --------------------------------------------------------------------------------------------

class AviaryEngine:
    def __init__(self, path: str, dtype: str, quantize: str | None, use_kernels: bool = True):
        import aviary
        from aviary.cpu import reference_only

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

    def info(self) -> dict:
        """What this worker runs: its decode path and the instruction set it was given."""
        from _common import decode_path

        from aviary import cpu

        return {"decode_path": decode_path(self.model), "isa": cpu.cpu_isa(),
                "forced_isa": os.environ.get(ISA_ENV) or None}


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


def make_engine(spec: dict):
    """The engine of a worker spec, and what it says about itself once loaded."""
    kind = spec["kind"]
    if kind == "aviary":
        eng = AviaryEngine(spec["path"], spec["dtype"], spec.get("quantize"), spec.get("kernels", True))
        return eng, eng.info()
    if kind == "pip":
        return PipEngine(spec["path"], spec["strategy"], spec["version"]), \
            {"rwkv": importlib.metadata.version("rwkv"), "strategy": spec["strategy"]}
    if kind == "llama.cpp":
        eng = llamacpp_peer.LlamaCppEngine(spec["gguf"], THREADS)
        return eng, eng.info()
    if kind == "gpt2":
        return GPT2Engine(spec["n_positions"]), {"transformers": importlib.metadata.version("transformers")}
    raise ValueError(f"unknown engine kind {kind!r}")


def worker_main(spec: dict) -> None:
    """Serve tasks from stdin (one JSON per line), answer one JSON per line on stdout. The first line says
    whether the engine loaded ({"ready": true, "info": ...} or {"ready": false, "error": ...})."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    kind = spec["kind"]
    out = sys.stdout
    sys.stdout = sys.stderr  # the pip package prints at import, while loading and while running
    try:
        eng, info = make_engine(spec)
    except Exception as e:  # a missing or broken peer: the parent skips it
        traceback.print_exc()
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True, "info": info}) + "\n")
    out.flush()
    g = torch.Generator().manual_seed(1)
    state = None
    for line in sys.stdin:
        task = json.loads(line)
        try:
            res = run_task(eng, kind, task, g, state)
        except Exception as e:
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        state = res.pop("_state", state)
        out.write(json.dumps(res) + "\n")
        out.flush()


def run_task(eng, kind: str, task: dict, g, state) -> dict:
    """One task of worker_main. A decode task returns the stream's state under "_state" (kept by the worker)."""
    import torch

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

            return {"times": _timed(one, task["n"]), "_state": box["s"]}
        if name == "prefill":
            toks = torch.randint(0, V, (1, task["T"]), generator=g)
            return {"times": _timed(lambda toks=toks: eng.step(toks, None), task["n"])}
        if name == "batch":
            B = task["B"]
            _, bstate = eng.step(torch.randint(0, V, (B, 16), generator=g), None)
            tok = torch.randint(0, V, (B, 1), generator=g)
            box = {"s": bstate}

            def one(box=box, tok=tok):
                box["s"] = eng.step(tok, box["s"])[1]

            return {"times": _timed(one, task["n"])}
        if name == "context":  # per-token decode with a context of `length` tokens behind it
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
            return {"times": _timed(one, task["n"]), "state_bytes": nbytes}
        if name == "logits":  # logits at every position of a fixed sequence (for the error)
            toks = torch.tensor(task["tokens"])[None]
            st, outs = None, []
            for t in range(toks.shape[1]):  # one token at a time: the decode path, as served
                lg, st = eng.step(toks[:, t:t + 1], st)
                outs.append(lg.float())
            torch.save(torch.cat(outs), task["out"])
            return {"path": task["out"]}
        if name == "info":
            return {"weight_bytes": eng.weight_bytes_per_token() if kind == "aviary" else None,
                    "state_bytes": eng.state_bytes() if kind == "aviary" else None}
        if name == "profile":
            return {"table": profile_decode(eng, g)}
    return {"error": f"unknown task {name}"}


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


class WorkerFailed(RuntimeError):
    """A worker died, failed to load its engine, or answered a task with an error."""


def pip_env(version: int) -> dict:
    return {"RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "1" if version == 7 else "0"}


# --torch-isa avx2: torch's own kernels (oneDNN, ATen) limited to AVX2 in every torch worker (Aviary, the pip
# package, GPT-2), so that on an AVX-512 machine the peers run as they would on an AVX2 CPU too (torch's bf16
# matmul, for one, has no bf16 instructions there). Set by main().
TORCH_ISA_ENV: dict = {}


def worker_env(spec: dict, extra: dict | None = None, base: dict | None = None) -> dict:
    """The environment of a worker: this one's, 2 OpenMP threads, the pip package's switches, and for an
    Aviary worker AVIARY_CPU_ISA=spec["isa"] (removed when the spec has none: the best the CPU runs)."""
    env = dict(os.environ if base is None else base, OMP_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY=OMP_WAIT_POLICY)
    if "omp_wait_policy" in spec:  # this engine's own policy (None: unset, the OpenMP runtime's default)
        env.pop("OMP_WAIT_POLICY")
        if spec["omp_wait_policy"]:
            env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
    if spec.get("kind") == "aviary":
        env.pop(ISA_ENV, None)
        if spec.get("isa"):
            env[ISA_ENV] = spec["isa"]
    elif spec.get("kind") == "pip":
        env.update(pip_env(spec["version"]))
    if spec.get("kind") != "llama.cpp":
        env.update(TORCH_ISA_ENV)
    env.update(extra or {})
    return env


class Worker:
    def __init__(self, name: str, spec: dict, env: dict | None = None):
        self.name = name
        self.spec = spec
        self.peer = PEER_OF_KIND.get(spec.get("kind"))  # None: an Aviary engine, whose failure is fatal
        self.failed: str | None = None
        self.info: dict = {}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     env=worker_env(spec, env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerFailed(f"worker {self.name} died (see its stderr above)")
        return json.loads(line)

    def ready(self) -> dict:
        """Wait for the engine to load; its info (decode path, versions), or WorkerFailed."""
        r = self._read()
        if not r.get("ready"):
            raise WorkerFailed(f"{self.name} did not load: {r.get('error')}")
        self.info = r.get("info") or {}
        return self.info

    def ask(self, **task) -> dict:
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(f"worker {self.name} died (see its stderr above)") from None
        r = self._read()
        if "error" in r:
            raise WorkerFailed(f"{self.name}: task {task.get('task')}: {r['error']}")
        return r

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_workers(specs: dict[str, dict], skipped: dict) -> dict[str, Worker]:
    """Start one worker per spec, all loading at once; wait for each. A peer that fails to load is skipped;
    an Aviary engine that fails is an error."""
    workers = {k: Worker(k, s) for k, s in specs.items()}
    try:
        for k, w in list(workers.items()):
            try:
                w.ready()
            except WorkerFailed as e:
                if w.peer is None:
                    raise
                skip(skipped, k, str(e))
                w.close()
                del workers[k]
    except BaseException:
        close_all(workers)
        raise
    return workers


def close_all(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.close()


def fail(workers: dict[str, Worker], k: str, err: Exception, skipped: dict) -> None:
    """A worker failed a task: a peer is left out from now on (skipped), an Aviary engine stops the run."""
    w = workers[k]
    if w.peer is None:
        raise err
    w.failed = str(err)
    skip(skipped, k, str(err))


def live(workers: dict[str, Worker]) -> dict[str, Worker]:
    return {k: w for k, w in workers.items() if not w.failed}


# ---- the parent -----------------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs)


def rounds(workers: dict[str, Worker], task: dict, n_rounds: int, per_round,
           skipped: dict | None = None) -> dict[str, list[float]]:
    """Run `task` on every worker in turn, `n_rounds` times; collect per_round(result) from each. A peer that
    fails is left out of the result (and skipped); an Aviary engine that fails raises."""
    skipped = {} if skipped is None else skipped
    out: dict[str, list[float]] = {k: [] for k, w in workers.items() if not w.failed}
    for _ in range(n_rounds):
        for k, w in workers.items():
            if k not in out:
                continue
            try:
                out[k].append(per_round(w.ask(**task)))
            except WorkerFailed as e:
                fail(workers, k, e, skipped)
                del out[k]
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


def extra_isas(args) -> list[str]:
    """The instruction sets of the extra Aviary fp32 engines (--extra-isas less the one the others run)."""
    names = [x.strip().lower() for x in (args.extra_isas or "").split(",") if x.strip()]
    main_isa = args.isa or args.best_isa
    return [x for x in dict.fromkeys(names) if x not in (main_isa, "torch")]


def engine_specs(version: int, path: str, args, skipped: dict, ggufs: dict | None = None) -> dict[str, dict]:
    """Every engine of a version's run, as worker specs; peers in `skipped` are left out."""
    def aviary(**kw):
        return {"kind": "aviary", "path": path, "isa": args.isa, "dtype": "float32", **kw}

    specs = {"aviary fp32": aviary()}
    for isa in extra_isas(args):
        specs[isa_engine(isa)] = aviary(isa=isa)
    specs[TORCH_ONLY] = aviary(isa="torch")
    specs["aviary bf16"] = aviary(dtype="bfloat16")
    specs["aviary int8"] = aviary(quantize="int8")
    if "rwkv" not in skipped:
        strategies = ["cpu fp32", "cpu bf16"] + ([] if version == 7 else ["cpu fp32i8"])  # no int8 for RWKV-7
        for s in strategies:
            specs[f"pip {s}"] = {"kind": "pip", "path": path, "strategy": s, "version": version}
    for outtype, gguf in (ggufs or {}).items():
        specs[LLAMA[outtype]] = {"kind": "llama.cpp", "gguf": str(gguf), "version": version,
                                 "omp_wait_policy": args.llama_omp_wait_policy}
    if args.engines:  # a subset; Aviary fp32 is every comparison's reference and always runs
        keep = {"aviary fp32", *(x.strip() for x in args.engines.split(",") if x.strip())}
        for name in sorted(keep - set(specs)):
            print(f"  --engines: RWKV-{version} has no engine {name!r} (it has: {', '.join(specs)})", flush=True)
        specs = {k: s for k, s in specs.items() if k in keep}
    return specs


def decode_only(name: str) -> bool:
    """Engines measured in single-stream decode only (and the logit checks)."""
    return name == TORCH_ONLY or name in LLAMA_PAIRS or (name.startswith("aviary fp32 ") and name != "aviary fp32")


def prepare_llama(version: int, path: str, work: Path, args, skipped: dict) -> dict:
    """The GGUF files of this version's checkpoint ({outtype: path}), or {} when llama.cpp is skipped."""
    if args.no_llama_cpp:
        skip(skipped, "llama.cpp", "--no-llama-cpp")
        return {}
    if "llama.cpp" in skipped:
        return {}
    reason = missing_peer("llama.cpp")
    if reason:
        skip(skipped, "llama.cpp", reason)
        return {}
    if version not in llamacpp_peer.VERSIONS:
        skip(skipped, f"llama.cpp RWKV-{version}", "llama.cpp runs RWKV-6 and RWKV-7 only")
        return {}
    t0 = time.perf_counter()
    try:
        tree = llamacpp_peer.source_tree(args.llama_cpp_src)
        print(f"  RWKV-{version}: GGUF files for llama.cpp ({tree / llamacpp_peer.CONVERTER})", flush=True)
        ggufs = llamacpp_peer.convert(path, work / f"{Path(path).stem}-gguf", tree)
    except llamacpp_peer.Unavailable as e:
        skip(skipped, "llama.cpp", str(e))
        return {}
    print(f"  RWKV-{version}: GGUF ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return ggufs


def llama_isa_note(workers: dict[str, Worker], aviary_isa: str) -> str | None:
    """A warning when llama.cpp was built for instructions the Aviary engines are kept from (AVX-512 against
    Aviary's avx2): then the comparison is not of the same target CPU."""
    systems = [w.info.get("system_info", "") for w in workers.values() if w.peer == "llama.cpp"]
    if aviary_isa != "avx512" and any("AVX512 = 1" in x for x in systems):
        return (f"llama.cpp runs AVX-512 here while Aviary runs {aviary_isa}: for an AVX2-only comparison, build "
                'llama.cpp for AVX2: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir --force-reinstall '
                "--no-deps llama-cpp-python")
    return None


def ask_logits(w: Worker, toks: list[int], out: str, **kw):
    import torch

    p = w.ask(task="logits", tokens=toks, out=out, **kw)
    return torch.load(p["path"])


def llama_check(workers: dict[str, Worker], skipped: dict, tmp: str, version: int) -> dict:
    """llama.cpp's logits against Aviary fp32's on a short prompt, token by token from a fresh state."""
    from aviary import WorldTokenizer

    toks = WorldTokenizer().encode(CHECK_PROMPT)
    ref = ask_logits(workers["aviary fp32"], toks, os.path.join(tmp, f"v{version}-check-aviary.pt"))
    res: dict = {"prompt": CHECK_PROMPT, "tokens": len(toks)}
    for name in LLAMA.values():
        if name not in live(workers):
            continue
        try:
            lg = ask_logits(workers[name], toks, os.path.join(tmp, f"v{version}-check-{name.replace(' ', '_')}.pt"))
        except WorkerFailed as e:
            fail(workers, name, e, skipped)
            continue
        res[f"{name} vs aviary fp32"] = e = error_stats(lg, ref)
        print(f"  RWKV-{version}: {name} vs aviary fp32, {len(toks)} tokens: logits max abs diff {e['max_abs']:.2e} "
              f"(logit RMS {e['logit_rms']:.2f}), top-1 agreement {100 * e['top1_agree']:.0f} %", flush=True)
    return res


def bench_version(version: int, path: str, args, tmp: str, res: dict | None = None, save=None,
                  skipped: dict | None = None, work: Path | None = None) -> dict:
    """One RWKV version's measurements, into `res` (also returned); `save()` after each stage."""
    import torch

    res = {} if res is None else res
    skipped = {} if skipped is None else skipped
    save = save or (lambda: None)
    ggufs = prepare_llama(version, path, Path(work or tmp), args, skipped)
    specs = engine_specs(version, path, args, skipped, ggufs)
    t0 = time.perf_counter()
    workers = start_workers(specs, skipped)
    print(f"  RWKV-{version}: {len(workers)} workers loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    res["engines"] = {k: {"spec": {s: v for s, v in w.spec.items() if s != "path"}, **w.info}
                      for k, w in workers.items()}
    for k, w in workers.items():
        if "decode_path" in w.info:
            print(f"    {k}: {w.info['decode_path']['summary']}", flush=True)
    note = llama_isa_note(workers, args.isa or args.best_isa)
    if note:
        res["llamacpp_note"] = note
        print(f"  note: {note}", flush=True)
    R = args.rounds
    try:
        res["info"] = workers["aviary fp32"].ask(task="info")
        for key, k in (("info_int8", "aviary int8"), ("info_bf16", "aviary bf16")):
            if k in workers:
                res[key] = workers[k].ask(task="info")
        if any(name in workers for name in LLAMA.values()):
            res["llamacpp_check"] = llama_check(workers, skipped, tmp, version)
        save()
        print(f"  RWKV-{version}: decode ({time.perf_counter() - t0:.0f} s)", flush=True)
        timed = {k: w for k, w in workers.items() if "i8" not in k or k.startswith("aviary")}  # pip i8: error only
        dec = rounds(timed, {"task": "decode", "n": args.steps}, R, lambda r: median(r["times"]), skipped)
        res["decode_ms"] = {k: 1e3 * median(v) for k, v in dec.items()}
        for peer, key in (("pip cpu fp32", "decode_ratio_vs_pip_fp32"), ("pip cpu bf16", "decode_ratio_vs_pip_bf16")):
            if peer in dec:  # how many times faster than the pip package
                res[key] = {k: median([p / a for p, a in zip(dec[peer], v, strict=True)]) for k, v in dec.items()}
        pairs = {a: ll for ll, a in LLAMA_PAIRS.items() if ll in dec and a in dec}
        if pairs:  # how many times faster than llama.cpp on weights of the same precision
            res["decode_ratio_vs_llamacpp"] = {a: median([p / x for p, x in zip(dec[ll], dec[a], strict=True)])
                                               for a, ll in pairs.items()}
        save()
        if args.profile:
            res["profile_fp32"] = workers["aviary fp32"].ask(task="profile")["table"]
            res["profile_int8"] = workers["aviary int8"].ask(task="profile")["table"]
        if args.tasks == "decode":
            return res
        timed = {k: w for k, w in live(timed).items() if not decode_only(k)}
        print(f"  RWKV-{version}: prefill {args.prefill} ({time.perf_counter() - t0:.0f} s)", flush=True)
        pre = rounds(timed, {"task": "prefill", "T": args.prefill, "n": 1}, max(2, R // 2),
                     lambda r: min(r["times"]), skipped)
        res["prefill_s"] = {k: median(v) for k, v in pre.items()}
        res["prefill_ratio_vs_pip"] = {
            k: median([p / a for p, a in zip(pre[peer], v, strict=True)])
            for k, v in pre.items()
            if k.startswith("aviary") and (peer := "pip cpu " + ("bf16" if "bf16" in k else "fp32")) in pre}
        save()
        print(f"  RWKV-{version}: batch {args.batch} ({time.perf_counter() - t0:.0f} s)", flush=True)
        av = {k: w for k, w in workers.items() if w.peer is None and not decode_only(k)}
        bat = {k: [] for k in av}
        single = {k: [] for k in av}
        for _ in range(R):  # batch and single stream measured back to back, per engine
            for k, w in av.items():
                bat[k].append(median(w.ask(task="batch", B=args.batch, n=args.steps)["times"]))
                single[k].append(median(w.ask(task="decode", n=args.steps)["times"]))
        res["batch_ms_per_step"] = {k: 1e3 * median(v) for k, v in bat.items()}
        res["batch_speedup_vs_single"] = {k: median([args.batch * s / b for s, b in zip(single[k], v, strict=True)])
                                          for k, v in bat.items()}
        save()
        print(f"  RWKV-{version}: logit error ({time.perf_counter() - t0:.0f} s)", flush=True)
        toks = torch.randint(0, V, (args.error_tokens,), generator=torch.Generator().manual_seed(7)).tolist()
        logits = {}
        for k, w in live(workers).items():
            if k == TORCH_ONLY:
                continue
            try:
                logits[k] = ask_logits(w, toks, os.path.join(tmp, f"v{version}-{k.replace(' ', '_')}.pt"))
            except WorkerFailed as e:
                fail(workers, k, e, skipped)
        if "aviary int8" in workers:
            logits["aviary int8 (dequantised reference)"] = ask_logits(
                workers["aviary int8"], toks, os.path.join(tmp, f"v{version}-int8-ref.pt"), reference=True)
        own = {"aviary": "aviary fp32", "pip": "pip cpu fp32", "llama.cpp": "llama.cpp f32"}
        res["error_vs_own_fp32"] = {}
        for k, lg in logits.items():
            ref = next(r for prefix, r in own.items() if k.startswith(prefix))
            if ref in logits:
                res["error_vs_own_fp32"][k] = error_stats(lg, logits[ref])
        if "pip cpu fp32" in logits:
            res["aviary_fp32_vs_pip_fp32"] = error_stats(logits["aviary fp32"], logits["pip cpu fp32"])
        for ll, a in LLAMA_PAIRS.items():
            if ll in logits:
                res.setdefault("llamacpp_vs_aviary", {})[f"{ll} vs {a}"] = error_stats(logits[ll], logits[a])
        save()
    finally:
        close_all(workers)
    return res


def bench_context(paths: dict[int, str], args, skipped: dict | None = None) -> dict:
    skipped = {} if skipped is None else skipped
    contexts = CONTEXTS[:2] if args.quick else CONTEXTS
    specs = {f"aviary fp32 RWKV-{v}": {"kind": "aviary", "path": p, "dtype": "float32", "isa": args.isa}
             for v, p in paths.items()}
    if "transformers" not in skipped:
        specs["GPT-2 (KV cache)"] = {"kind": "gpt2", "n_positions": max(contexts) + 64}
    workers = start_workers(specs, skipped)
    out: dict = {"contexts": list(contexts), "ms": {k: [] for k in workers}, "state_bytes": {k: [] for k in workers}}
    try:
        for length in contexts:
            print(f"  context {length}", flush=True)
            per = rounds(workers, {"task": "context", "length": length, "n": args.steps}, max(2, args.rounds // 2),
                         lambda r: median(r["times"]), skipped)
            for k in per:
                try:
                    nbytes = workers[k].ask(task="context", length=length, n=1)["state_bytes"]
                except WorkerFailed as e:
                    fail(workers, k, e, skipped)
                    continue
                out["ms"][k].append(1e3 * median(per[k]))
                out["state_bytes"][k].append(nbytes)
        for k, w in workers.items():  # a peer that failed part-way: its partial row would not line up
            if w.failed:
                out["ms"].pop(k)
                out["state_bytes"].pop(k)
    finally:
        close_all(workers)
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
    versions = [v for v in (6, 7) if results.get(f"rwkv{v}", {}).get("decode_ms")]
    order = ["pip cpu fp32", "pip cpu bf16", "llama.cpp f32", "llama.cpp q8_0", "aviary fp32", "aviary bf16",
             "aviary int8"]
    engines = [e for e in order if any(e in results[f"rwkv{v}"]["decode_ms"] for v in versions)]
    width = 0.8 / max(1, len(versions))
    for j, v in enumerate(versions):
        r = results[f"rwkv{v}"]
        tps = [1e3 / r["decode_ms"][e] if e in r["decode_ms"] else 0 for e in engines]
        xs = [i + (j - (len(versions) - 1) / 2) * width for i in range(len(engines))]
        ax1.bar(xs, tps, width, label=f"RWKV-{v}")
    ax1.set_xticks(range(len(engines)), [e.replace("cpu ", "") for e in engines], rotation=30, ha="right")
    ax1.set_ylabel("tokens / s (single stream)")
    isa = (results.get("isa") or {}).get("workers", "")
    ax1.set_title(f"decode, L12-D768-V65536, 2 threads{', Aviary ' + isa if isa else ''}")
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


def _x(ratios: dict | None, k: str) -> str:
    return f"{ratios[k]:.2f}" if ratios and k in ratios else "–"


def table(results: dict) -> str:
    """Markdown tables of the results."""
    lines = []
    backend = results.get("backend") or {}
    if backend:
        runnable = ", ".join(backend.get("runnable", []))
        lines.append(f"CPU: {backend.get('cpu')}; Aviary workers' instruction set: "
                     f"{(results.get('isa') or {}).get('workers')} (runnable: {runnable})")
    for peer, reason in (results.get("skipped") or {}).items():
        lines.append(f"skipped {peer}: {reason}")
    bw = results["copy_bandwidth_gbs"]
    for v in (4, 5, 6, 7):
        r = results.get(f"rwkv{v}")
        if not r or "decode_ms" not in r:
            continue
        wb = {"aviary fp32": r["info"]["weight_bytes"], "aviary bf16": r.get("info_bf16", {}).get("weight_bytes"),
              "aviary int8": r.get("info_int8", {}).get("weight_bytes")}
        for isa_name in r["decode_ms"]:
            if isa_name.startswith("aviary fp32 "):
                wb[isa_name] = r["info"]["weight_bytes"]
        lines += [f"\n**RWKV-{v}** (L{L}-D{D}-V{V}, random weights), single-stream decode, median of rounds\n",
                  "| engine | ms/token | tokens/s | × pip fp32 | × pip bf16 | weight bytes/token | bandwidth bound "
                  "ms/token | % of bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, ms in r["decode_ms"].items():
            b = wb.get(k)
            bound = 1e3 * b / (bw * 1e9) if b else None
            lines.append(f"| {k} | {ms:.1f} | {1e3 / ms:.1f} | {_x(r.get('decode_ratio_vs_pip_fp32'), k)} | "
                         f"{_x(r.get('decode_ratio_vs_pip_bf16'), k)} | "
                         + (f"{b / 1e6:.0f} MB | {bound:.1f} | {100 * bound / ms:.0f} % |" if b else "| | |"))
        paths = {k: e["decode_path"] for k, e in (r.get("engines") or {}).items() if "decode_path" in e}
        if paths:
            lines += ["", "Decode path of each Aviary engine (`model.decode_path`, as the worker loaded it):", "",
                      "| engine | AVIARY_CPU_ISA | decode path |", "|---|---|---|"]
            for k, p in paths.items():
                forced = r["engines"][k].get("forced_isa") or "(unset: best)"
                lines.append(f"| {k} | {forced} | {p['summary']} |")
        ratio = r.get("decode_ratio_vs_llamacpp")
        if ratio or r.get("llamacpp_check"):
            lines += ["", "Aviary against llama.cpp (same checkpoint through GGUF; single-stream decode):", ""]
            engines = r.get("engines") or {}
            for k in LLAMA.values():
                if engines.get(k, {}).get("system_info"):
                    e = engines[k]
                    omp = (e.get("spec") or {}).get("omp_wait_policy") or "unset"
                    lines.append(f"- {k}: llama-cpp-python {e.get('llama_cpp_python')}, OMP_WAIT_POLICY {omp}, "
                                 f"{e['system_info'].strip()}")
            if r.get("llamacpp_note"):
                lines.append(f"- note: {r['llamacpp_note']}")
            lines += ["", "| llama.cpp | ms/token | Aviary | ms/token | Aviary × llama.cpp | "
                          "logits vs Aviary fp32, max abs |", "|---|---|---|---|---|---|"]
            check = r.get("llamacpp_check") or {}
            for ll, a in LLAMA_PAIRS.items():
                e = check.get(f"{ll} vs aviary fp32")
                if ll not in r["decode_ms"] and not e:
                    continue
                ms = r["decode_ms"].get(ll)
                ms_text = f"{ms:.1f}" if ms else "–"
                err_text = f"{e['max_abs']:.1e}" if e else "–"
                lines.append(f"| {ll} | {ms_text} | {a} | {r['decode_ms'].get(a, 0):.1f} | {_x(ratio, a)} | "
                             f"{err_text} |")
        if "prefill_s" not in r:
            continue
        lines += ["", f"Prefill of {results['args']['prefill']} tokens (one call, fresh state):", "",
                  "| engine | seconds | tokens/s | × pip same dtype |", "|---|---|---|---|"]
        for k, s in r["prefill_s"].items():
            lines.append(f"| {k} | {s:.2f} | {results['args']['prefill'] / s:.0f} | "
                         f"{_x(r.get('prefill_ratio_vs_pip'), k)} |")
        if "batch_ms_per_step" in r:
            lines += ["", f"Batch-{results['args']['batch']} decode (Aviary):", "",
                      "| engine | ms/step | aggregate tokens/s | × single stream |", "|---|---|---|---|"]
            for k, ms in r["batch_ms_per_step"].items():
                lines.append(f"| {k} | {ms:.1f} | {results['args']['batch'] * 1e3 / ms:.0f} | "
                             f"{r['batch_speedup_vs_single'][k]:.1f} |")
        if "error_vs_own_fp32" not in r:
            continue
        lines += ["", f"Logit error against the same implementation's fp32 ({results['args']['error_tokens']} "
                      "positions, token by token; logits RMS "
                      f"{r['error_vs_own_fp32']['aviary fp32']['logit_rms']:.2f}):", "",
                  "| engine | max abs | RMS / logit RMS | top-1 agreement | first position: max abs | "
                  "first position: RMS / logit RMS |", "|---|---|---|---|---|---|"]
        for k, e in r["error_vs_own_fp32"].items():
            if k in ("aviary fp32", "pip cpu fp32", "llama.cpp f32"):
                continue
            lines.append(f"| {k} | {e['max_abs']:.3f} | {100 * e['rel_rms']:.2f} % | {100 * e['top1_agree']:.1f} % | "
                         f"{e['first_max_abs']:.3f} | {100 * e['first_rel_rms']:.2f} % |")
        cross = dict(r.get("llamacpp_vs_aviary") or {})  # two implementations of the same model
        if "aviary_fp32_vs_pip_fp32" in r:
            cross = {"aviary fp32 vs pip fp32": r["aviary_fp32_vs_pip_fp32"], **cross}
        for k, e in cross.items():
            lines.append(f"| {k} | {e['max_abs']:.2e} | {100 * e['rel_rms']:.3f} % | {100 * e['top1_agree']:.1f} % | "
                         f"{e['first_max_abs']:.1e} | {100 * e['first_rel_rms']:.4f} % |")
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


def parse_args(argv=None) -> argparse.Namespace:
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
    ap.add_argument("--isa", choices=ISAS, type=str.lower, default=None,
                    help=f"run every Aviary worker with {ISA_ENV}=ISA (default: this environment's {ISA_ENV}; "
                         "unset, the best this CPU runs)")
    ap.add_argument("--torch-isa", choices=("avx2",), default=None,
                    help="limit torch's own kernels to AVX2 in every torch worker (ONEDNN_MAX_CPU_ISA=AVX2, "
                         "ATEN_CPU_CAPABILITY=avx2): with --isa avx2, an AVX-512 machine runs Aviary and its torch "
                         "peers as an AVX2 CPU would")
    ap.add_argument("--extra-isas", default="generic",
                    help="comma-separated instruction sets of extra 'aviary fp32 ISA' engines, single-stream "
                         "decode only (default: generic, the portable C path; '' for none)")
    ap.add_argument("--engines", help="comma-separated engine names to run, e.g. 'aviary int8,llama.cpp q8_0' "
                    "(default: all; 'aviary fp32', the reference of every comparison, always runs)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when it is installed")
    ap.add_argument("--llama-cpp-src", help="a llama.cpp source tree (or unpacked llama-cpp-python sdist) with "
                    "convert_hf_to_gguf.py and gguf-py/ (default: the sdist of the installed llama-cpp-python, "
                    "fetched with pip download once into ~/.cache/aviary/llama.cpp)")
    ap.add_argument("--llama-omp-wait-policy", choices=("PASSIVE", "ACTIVE"), type=str.upper, default=None,
                    help="OMP_WAIT_POLICY of the llama.cpp workers (default: unset, llama.cpp's default; the "
                         "others run with $OMP_WAIT_POLICY or PASSIVE)")
    ap.add_argument("--profile", action="store_true", help="also profile one decode step by op")
    ap.add_argument("--workdir", help="keep the random checkpoints (and GGUF files) here (re-used when present)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "benchmarks_inference.png"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.prefill, args.error_tokens = 2, 2, 64, 8
    if args.isa is None:  # the environment's choice, recorded and passed on explicitly
        args.isa = (os.environ.get(ISA_ENV) or "").strip().lower() or None
    return args


def set_isa(args) -> None:
    """Make this process run args.isa as its workers will (AVIARY_CPU_ISA before aviary.cpu is imported, or
    use_isa when it already is), so that its backend_info() describes them; fill args.best_isa."""
    if args.isa:
        os.environ[ISA_ENV] = args.isa
    from aviary import cpu

    runnable = cpu.runnable_isas()
    args.best_isa = runnable[0]
    if args.isa and args.isa not in runnable:
        raise SystemExit(f"--isa {args.isa}: this CPU and build run {', '.join(runnable)}")
    if args.isa and cpu.cpu_isa() != args.isa:
        cpu.use_isa(args.isa)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_isa(args)
    if args.torch_isa == "avx2":
        TORCH_ISA_ENV.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")

    import torch
    from _common import backend_info

    from aviary.testing import random_config, save_random_checkpoint

    skipped: dict[str, str] = {}
    for peer in ("rwkv", "transformers"):
        reason = missing_peer(peer)
        if reason:
            skip(skipped, peer, reason)
    from aviary import cpu

    for isa in extra_isas(args):
        if isa not in cpu.runnable_isas():
            skip(skipped, isa_engine(isa), f"this CPU and build run {', '.join(cpu.runnable_isas())}")
    args.extra_isas = ",".join(x for x in extra_isas(args) if x in cpu.runnable_isas())

    t_start = time.perf_counter()
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
                                                         "cores": os.cpu_count(), "omp_wait_policy": OMP_WAIT_POLICY},
                         "backend": backend_info(),
                         "isa": {"workers": args.isa or f"{args.best_isa} (best; {ISA_ENV} unset)",
                                 "forced": args.isa, "extra": [x for x in args.extra_isas.split(",") if x],
                                 "torch_workers": dict(TORCH_ISA_ENV) or None},
                         "skipped": skipped}

        def save() -> None:
            results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write_json(args.json, results)  # partial results as they come

        results["copy_bandwidth_gbs"] = copy_bandwidth()
        print(f"copy bandwidth {results['copy_bandwidth_gbs']:.1f} GB/s (read + write); Aviary workers: "
              f"{results['isa']['workers']}", flush=True)
        save()
        for v, p in paths.items():
            results[f"rwkv{v}"] = {}
            bench_version(v, p, args, tmp, results[f"rwkv{v}"], save, skipped, work)
            save()
        if args.tasks == "all":
            print("context sweep", flush=True)
            results["context"] = bench_context(paths, args, skipped)
        save()
    text = table(results)
    print(text)
    for v in (4, 5, 6, 7):
        for key in ("profile_fp32", "profile_int8"):
            if key in results.get(f"rwkv{v}", {}):
                print(f"\nRWKV-{v} {key}\n{results[f'rwkv{v}'][key]}")
    if "context" in results and plot(results, Path(args.png)):
        print(f"plot: {args.png}")
    print(f"json: {args.json} ({results['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
