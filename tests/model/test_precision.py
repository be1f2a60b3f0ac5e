"""Half precision: fp16 (with the layer-rescale trick for v4-v6) stays close to fp32, on CPU and on GPU."""

import pytest
import torch

from aviary.loading import load, model_from_state_dict
from aviary.model.rescale import apply_rescale
from aviary.testing import random_config, random_state_dict, save_random_checkpoint

VERSIONS = [4, 5, 6, 7]
# Measured on these random models (logits ~ +-4): fp16 0.004-0.014, bf16 0.02-0.06.
FP16_ATOL = 0.05


def _run(model, x, device):
    with torch.no_grad():
        return model.to(device)(x.to(device))[0].float().cpu()


@pytest.mark.parametrize("version", VERSIONS)
def test_fp16_load_applies_rescale_and_stays_close(version, tmp_path):
    cfg = random_config(version, n_layer=4, n_embd=128)
    path = tmp_path / "m.pth"
    sd = save_random_checkpoint(path, cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = _run(model_from_state_dict(sd), x, "cpu")
    half = load(path, dtype="float16")
    assert half.emb.weight.dtype == torch.float16
    assert half.rescale_every == (6 if half.spec.supports_rescale else 0)
    assert (_run(half, x, "cpu") - ref).abs().max() < FP16_ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_cpu_fp32(version, dtype):
    cfg = random_config(version, n_layer=4, n_embd=256)
    sd = random_state_dict(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = _run(model_from_state_dict(sd), x, "cpu")
    model = model_from_state_dict(sd).to(dtype=dtype)
    if dtype == torch.float16 and model.spec.supports_rescale:
        apply_rescale(model, 2)
    out = _run(model, x, "cuda")
    tol = {torch.float32: 1e-3, torch.bfloat16: 0.15, torch.float16: FP16_ATOL}[dtype]
    assert (out - ref).abs().max() < tol
