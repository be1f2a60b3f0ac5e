"""Run the reference `rwkv` pip package (0.8.32) on checkpoints, in a subprocess, and read its outputs.

The pip package is configured by environment variables read at import (`RWKV_V7_ON=1` turns the whole
package into RWKV-7), so RWKV-7 and RWKV-4/5/6 cannot share a process. `run_oracle` therefore starts one
`python oracle.py JOB.json OUT.safetensors` per environment (two: RWKV-4/5/6 and RWKV-7, run side by
side); each child runs every job of its batch and writes, per job name, the logits and the state in
Aviary's layout:

    {name}.logits       [T, V] float32     every position (`full_output=True`, or one call per token)
    {name}.shift        [L, 2, C] float32  after the last token
    {name}.wkv          [L, *S]  float32   Aviary's orientation (`aviary.state.from_pip_state`)
    {name}.mid.shift / .mid.wkv            for mode "split", the state after the first part

A job is a dict: name, version (4-7), model (a `.pth` path), strategy ("cpu fp32" or "cpu bf16"),
tokens (ints), mode ("sequence": one call; "step": one call per token; "split": tokens[:split], then the
rest from the state), split (for mode "split"). The parent only needs torch and safetensors; the child imports `rwkv`
(and `aviary.state`, which imports nothing of the rest of Aviary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["rwkv_available", "run_oracle"]


def rwkv_available() -> bool:
    """Whether the pip package is installed (found without importing it: importing reads the env)."""
    import importlib.util

    return importlib.util.find_spec("rwkv") is not None


def pip_env(version: int) -> dict[str, str]:
    """The environment the pip package reads at import: no CUDA, no TorchScript where it can be avoided
    (RWKV-7 always scripts), and RWKV_V7_ON for RWKV-7 only."""
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if version == 7 else "0")
    env.setdefault("OMP_NUM_THREADS", "1")  # many tiny matmuls: threads cost more than they give
    return env


def run_oracle(jobs: list[dict], timeout: float = 300) -> dict[str, torch.Tensor]:
    """Run `jobs` through the pip package: one subprocess for the RWKV-7 jobs and one for the rest, side
    by side. See the module docstring for the job and output format."""
    from safetensors.torch import load_file

    batches = {v7: [j for j in jobs if (j["version"] == 7) == v7] for v7 in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for v7, batch in batches.items():
            if not batch:
                continue
            job_file, out_file = Path(tmp) / f"job{int(v7)}.json", Path(tmp) / f"out{int(v7)}.safetensors"
            job_file.write_text(json.dumps(batch))
            log = Path(tmp) / f"log{int(v7)}.txt"  # a file, not a pipe: nothing can block on it
            with open(log, "w") as f:  # the child keeps its own handle
                procs[v7] = (out_file, log, subprocess.Popen([sys.executable, __file__, str(job_file), str(out_file)],
                                                             env=pip_env(7 if v7 else 4), stdout=f,
                                                             stderr=subprocess.STDOUT))
        results: dict[str, torch.Tensor] = {}
        try:
            for v7, (out_file, log, proc) in procs.items():
                if proc.wait(timeout=timeout) != 0:
                    raise RuntimeError(f"oracle subprocess ({'RWKV-7' if v7 else 'RWKV-4/5/6'}) failed:\n"
                                       f"{log.read_text()[-6000:]}")
                results.update(load_file(str(out_file)))
        finally:
            for _, _, proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return results


# ---- the child: runs inside the pip package's environment ---------------------------------------------

def _initial_state(model, version: int, path: str) -> list[torch.Tensor] | None:
    """None (the pip package's own initial state) except for a state-tuned RWKV-7 file: 0.8.32's
    RWKV_x070 ignores `time_state`, so put it in the wkv slots ourselves. Official v7 `time_state` is
    [H, V, K], the layout RWKV_x070 keeps its state in, so it goes in as is."""
    if version != 7:
        return None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    keys = [f"blocks.{i}.att.time_state" for i in range(model.n_layer)]
    if keys[0] not in sd:
        return None
    state = model.generate_zero_state()
    for i, k in enumerate(keys):
        state[i * 3 + 1] = sd[k].float().clone()
    return state


def _ours(version: int, state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pip package's state -> Aviary's (shift [L, 2, C], wkv [L, *S]), float32 copies."""
    from aviary.state import from_pip_state

    s = from_pip_state(version, state)
    return s.shift[0], s.wkv[0]


def _run_job(model, version: int, job: dict) -> dict[str, torch.Tensor]:
    tokens, mode = job["tokens"], job["mode"]
    state = _initial_state(model, version, job["model"])
    out: dict[str, torch.Tensor] = {}
    if mode == "sequence":
        logits, state = model.forward(tokens, state, full_output=True)
    elif mode == "step":
        steps = []
        for t in tokens:
            logit, state = model.forward([t], state)
            steps.append(logit.clone())
        logits = torch.stack(steps)
    elif mode == "split":
        k = job["split"]
        first, state = model.forward(tokens[:k], state, full_output=True)
        first = first.view(k, -1).clone()
        out["mid.shift"], out["mid.wkv"] = _ours(version, state)  # copies: forward mutates state
        rest, state = model.forward(tokens[k:], state, full_output=True)
        logits = torch.cat([first, rest.view(len(tokens) - k, -1)])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out["logits"] = logits.float().view(len(tokens), -1)
    out["shift"], out["wkv"] = _ours(version, state)
    return out


def main(job_file: str, out_file: str) -> None:
    from safetensors.torch import save_file

    jobs = json.loads(Path(job_file).read_text())
    v7 = os.environ.get("RWKV_V7_ON") == "1"
    if any((job["version"] == 7) != v7 for job in jobs):
        raise ValueError(f"RWKV_V7_ON={int(v7)} cannot run this batch: RWKV-7 and RWKV-4/5/6 need separate processes")
    torch.set_num_threads(1)
    from rwkv.model import RWKV as PipRWKV  # after the env is set (by run_oracle)

    models: dict[tuple[str, str], object] = {}
    results: dict[str, torch.Tensor] = {}
    for job in jobs:
        key = (job["model"], job["strategy"])
        if key not in models:
            path = job["model"].removesuffix(".pth")  # RWKV_x070 always appends ".pth"
            models[key] = PipRWKV(model=path, strategy=job["strategy"], **({} if v7 else {"verbose": False}))
        for name, t in _run_job(models[key], job["version"], job).items():
            results[f"{job['name']}.{name}"] = t.contiguous()
    save_file(results, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
