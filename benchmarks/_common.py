"""What every benchmark records next to its numbers: what ran them.

Each benchmark's JSON has "backend" (`aviary.cpu.backend_info()`: the CPU, the instruction set of Aviary's C
kernels, the ones this CPU runs, threads, and AVIARY_CPU_ISA when it forced one) and, where it loads a model,
"decode_path" (`model.decode_path.as_dict()` plus its one-line summary), so that a number can be traced to
the code that produced it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ISA_ENV = "AVIARY_CPU_ISA"  # aviary.cpu.ENV_VAR, read once when aviary.cpu is imported


def backend_info() -> dict:
    """aviary.cpu.backend_info() of this process."""
    from aviary.cpu import backend_info as info

    return info()


def decode_path(model) -> dict:
    """model.decode_path as plain data, with its one-line summary under "summary"."""
    path = model.decode_path
    return {**path.as_dict(), "summary": str(path)}


_PROBE = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
import aviary
m = aviary.load(sys.argv[1], dtype=sys.argv[3], quantize=sys.argv[4] or None)
p = m.decode_path
print(json.dumps({**p.as_dict(), "summary": str(p)}))
"""


def probe_decode_path(path: str, threads: int | None = None, dtype: str = "float32", quantize: str | None = None,
                      env: dict | None = None, timeout: float = 600) -> dict:
    """The decode path that `aviary.load(path, dtype=..., quantize=...)` gets with `threads` torch threads in a
    fresh process (the environment's AVIARY_CPU_ISA applies): for a benchmark whose model runs in another
    process (a server). {"error": ...} when the probe fails."""
    import torch

    threads = threads or torch.get_num_threads()
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(threads), dtype, quantize or ""],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"the probe did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` to `path` whole or not at all (a temporary file renamed over it), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def model_flops_per_token(model) -> float:
    """Training FLOPs per token of an RWKV-7: 6 x the parameters used in matmuls (every 2-D weight but the
    embedding, a lookup) + 3 x the delta rule's own (decay, delete, write, read: 4 N^2 mul-adds per head)."""
    cfg = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "emb.weight")
    delta = cfg.n_layer * cfg.n_head * 4 * cfg.head_size**2 * 2
    return 6 * matmul_params + 3 * delta
