"""Regenerate `pip_logits.safetensors`: the `rwkv` pip package's (0.8.32, `cpu fp32`) logits for tiny
fixed-seed random checkpoints of RWKV-4/5/6/7 (and a state-tuned RWKV-7), so that `tests/model/test_golden.py`
checks parity with the reference on machines without the pip package.

    python tests/data/golden/make_golden.py

The file is self-describing: its metadata `cases` (JSON) holds, per case, the `random_config` arguments,
the seed, whether the file has `time_state`, the tokens, and a checksum of the weights (to tell "the
random-checkpoint generator changed" apart from "the model changed"). Tensors: `{name}` = logits [T, V].
Needs the pip package (run it where `pytest -m oracle` runs).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "pip_logits.safetensors"

# Tiny on purpose: V=64 and T=6 keep each case's logits at 1.5 KB.
CASES = {
    "v4": dict(config=dict(version=4, n_layer=2, n_embd=64, vocab_size=64), seed=11),
    "v5": dict(config=dict(version=5, n_layer=2, n_embd=64, vocab_size=64, head_size=32), seed=12),
    "v6": dict(config=dict(version=6, n_layer=2, n_embd=64, vocab_size=64, head_size=32), seed=13),
    "v7": dict(config=dict(version=7, n_layer=2, n_embd=64, vocab_size=64, head_size=32), seed=14),
    "v7-state-tuned": dict(config=dict(version=7, n_layer=2, n_embd=64, vocab_size=64, head_size=32), seed=15,
                           time_state=True),
}
T = 6


def weights_checksum(sd: dict[str, torch.Tensor]) -> float:
    """A number that changes when any weight does (sum of |w| in float64, in key order)."""
    return float(sum(sd[k].double().abs().sum() for k in sorted(sd)))


def build_cases() -> dict[str, dict]:
    """The full description of every case: the CASES entries plus tokens and the weights' checksum."""
    from aviary.testing import random_config, random_state_dict

    cases = {}
    for name, spec in CASES.items():
        cfg = random_config(**spec["config"])
        sd = random_state_dict(cfg, seed=spec["seed"], time_state=spec.get("time_state", False))
        g = torch.Generator().manual_seed(spec["seed"])
        tokens = torch.randint(0, cfg.vocab_size, (T,), generator=g).tolist()
        cases[name] = dict(spec, time_state=spec.get("time_state", False), tokens=tokens,
                           checksum=weights_checksum(sd))
    return cases


def golden_jobs(cases: dict[str, dict], folder: str | Path) -> list[dict]:
    """Write each case's checkpoint into `folder`; the oracle jobs (sequence mode) that give its logits."""
    from aviary.testing import random_config, save_random_checkpoint

    jobs = []
    for name, case in cases.items():
        path = str(Path(folder) / f"golden-{name}.pth")
        save_random_checkpoint(path, random_config(**case["config"]), seed=case["seed"], time_state=case["time_state"])
        jobs.append(dict(name=f"golden/{name}", version=case["config"]["version"], model=path, strategy="cpu fp32",
                         tokens=case["tokens"], mode="sequence"))
    return jobs


def main() -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE.parents[1]))  # tests/, for oracle.py
    from oracle import run_oracle

    cases = build_cases()
    with tempfile.TemporaryDirectory() as tmp:
        out = run_oracle(golden_jobs(cases, tmp))
    logits = {name: out[f"golden/{name}.logits"] for name in cases}
    save_file(logits, str(GOLDEN), metadata={"cases": json.dumps(cases), "source": "rwkv==0.8.32 cpu fp32"})
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
