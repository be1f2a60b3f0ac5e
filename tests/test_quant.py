"""int8 weight-only quantisation: the kernel against its reference, the scheme's error bound, and whole models."""

import pytest
import torch
import torch.nn as nn

import aviary
from aviary import cpu
from aviary.cpu import Linear
from aviary.loading import model_from_state_dict
from aviary.model.rescale import apply_rescale
from aviary.quant import (
    KERNEL_MAX_ROWS,
    Int8Linear,
    int8_linear_kernel,
    int8_linear_reference,
    quantize_int8,
)
from aviary.testing import random_config, random_state_dict, save_random_checkpoint

needs_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                                  reason="this torch has no _weight_int8pack_mm")


def test_quantize_int8_rounds_each_row_to_within_half_a_step():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row stays zero and gets a finite scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert q.abs().max() <= 127 and torch.isfinite(scale).all()
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS])
@pytest.mark.parametrize("shape", [(300, 128), (96, 64)])
def test_kernel_matches_reference(rows, shape):
    g = torch.Generator().manual_seed(1)
    q, scale = quantize_int8(torch.randn(shape, generator=g))
    x = torch.randn(rows, shape[1], generator=g)
    ref = int8_linear_reference(x.double(), q, scale.double())
    out = int8_linear_kernel(x, q, scale.to(torch.bfloat16))
    assert out.dtype == x.dtype
    # bf16 rounding of x, of the scale and of the output: ~3 relative errors of 2^-9 each
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_the_float_linear(dtype):
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(128, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 128, generator=g) / 128**0.5)
    lin = lin.to(dtype)
    q = Int8Linear.from_linear(lin)
    limit = cpu.MAX_ROWS[torch.int8] if q.kernel == "aviary" else KERNEL_MAX_ROWS
    for rows in (1, 7, limit // 2 + 5):  # x has 2 x rows: the kernel (2, 14) and the dequantised matmul
        x = torch.randn(2, rows, 128, generator=g).to(dtype)
        ref = lin(x).float()
        out = q(x)
        assert out.shape == (2, rows, 256) and out.dtype == dtype
        rel = (out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
        assert rel < 0.02  # int8 per-row: ~0.5 %; plus bf16 rounding


def test_int8_linear_refuses_a_bias():
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_linear(nn.Linear(4, 4))


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_quantized_model_stays_close_to_fp32(version):
    cfg = random_config(version, n_layer=2, n_embd=128, vocab_size=300)
    sd = random_state_dict(cfg)
    ref_model = model_from_state_dict(sd)
    model = model_from_state_dict(sd).quantize("int8")
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert n_int8 == sum(isinstance(m, nn.Linear) for m in ref_model.modules())  # every linear, head included
    x = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_state = ref_model(x)
        seq, state = model(x)
        # decode token by token (the kernel path) == the sequence (the dequantised path), up to bf16 rounding
        st, steps = None, []
        for t in range(x.shape[1]):
            lg, st = model(x[:, t:t + 1], st, last_only=True)
            steps.append(lg)
    rel = (seq - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert rel < 0.03, rel  # measured 0.3-0.6 % on these models
    assert (torch.cat(steps, 1) - seq).abs().max() < 0.05 * ref.abs().max()
    assert state.wkv.dtype == torch.float32 and state.wkv.shape == ref_state.wkv.shape


def test_load_quantize_option_and_head_flag(tmp_path):
    cfg = random_config(7, n_layer=2, n_embd=128, vocab_size=300)
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, cfg)
    model = aviary.load(path, quantize="int8")
    assert isinstance(model.head, Int8Linear) and isinstance(model.blocks[1].ffn.value, Int8Linear)
    assert isinstance(model.blocks[0].att.w1, nn.Parameter)  # LoRAs stay float
    keep_head = aviary.load(path).quantize("int8", head=False)
    assert isinstance(keep_head.head, Linear) and keep_head.split_decode_threads  # float head keeps the kernel
    assert isinstance(keep_head.blocks[0].att.key, Int8Linear)
    with pytest.raises(ValueError, match="scheme"):
        aviary.load(path, quantize="int4")
    with pytest.raises(ValueError, match="already quantised"):
        model.quantize("int8")


def test_rescale_must_come_before_quantisation():
    model = model_from_state_dict(random_state_dict(random_config(6, n_layer=2, n_embd=128))).quantize("int8")
    with pytest.raises(ValueError, match="before quantising"):
        apply_rescale(model, 1)
