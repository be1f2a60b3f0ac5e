"""Parity with the reference without the reference installed: logits of the `rwkv` pip package (0.8.32,
`cpu fp32`) for tiny fixed-seed random checkpoints, checked in at `data/golden/pip_logits.safetensors`
(regenerate with `python tests/data/golden/make_golden.py`). Each test rebuilds the checkpoint from its
seed with `aviary.testing` and compares Aviary's logits with the stored ones at 1e-4 (fp32). Where the pip
package is installed, test_parity_oracle.py also checks that the file is still what it outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from aviary.loading import model_from_state_dict
from aviary.testing import random_config, random_state_dict

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "pip_logits.safetensors"
ATOL = 1e-4  # fp32; logits ~ +-4, measured max differences ~3e-6
REGENERATE = "python tests/data/golden/make_golden.py"


def read_golden() -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        cases = json.loads(f.metadata()["cases"])
        return cases, {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _import_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN.parent / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES, LOGITS = read_golden()
make_golden = _import_make_golden()


@pytest.fixture(scope="module", params=sorted(CASES))
def golden(request):
    """(case name, its description, the regenerated state dict, the pip package's logits)."""
    weights_checksum = make_golden.weights_checksum
    case = CASES[request.param]
    sd = random_state_dict(random_config(**case["config"]), seed=case["seed"], time_state=case["time_state"])
    if abs(weights_checksum(sd) - case["checksum"]) > 1e-9 * case["checksum"]:
        pytest.fail(f"aviary.testing no longer rebuilds the weights the golden file was made from "
                    f"(checksum {weights_checksum(sd)!r}, stored {case['checksum']!r}); if that change was "
                    f"intended, run `{REGENERATE}` where the rwkv pip package is installed")
    return request.param, case, sd, LOGITS[request.param]


def test_golden_file_is_small_and_complete():
    assert GOLDEN.stat().st_size < 16_000
    assert {c["config"]["version"] for c in CASES.values()} == {4, 5, 6, 7}
    assert any(c["time_state"] for c in CASES.values())


@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
@torch.no_grad()
def test_whole_sequence_matches_stored_pip_logits(golden, backend):
    name, case, sd, ref = golden
    model = model_from_state_dict(sd, backend=backend)
    logits, _ = model(torch.tensor(case["tokens"])[None])
    err = (logits[0] - ref).abs().max().item()
    assert err <= ATOL, f"{name} ({backend}): max |Aviary - pip| = {err:.2e}"


@torch.no_grad()
def test_split_prefill_matches_stored_pip_logits(golden):
    """The state carried between calls is what the reference's logits need."""
    name, case, sd, ref = golden
    model = model_from_state_dict(sd)
    x = torch.tensor(case["tokens"])[None]
    first, state = model(x[:, :2])
    middle, state = model(x[:, 2:3], state)
    rest, _ = model(x[:, 3:], state)
    err = (torch.cat([first, middle, rest], 1)[0] - ref).abs().max().item()
    assert err <= ATOL, f"{name}: max |Aviary - pip| = {err:.2e}"
