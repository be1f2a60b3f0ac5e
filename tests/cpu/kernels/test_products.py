"""Aviary's C products against their references (F.linear, the dequantised int8 product, torch.bmm):
`cpu.linear` and `cpu.matmul`, the `cpu.Linear` and `Int8Linear` layers, their worker pool, and bf16 products
where torch has no bf16 matmul. Each test runs once per instruction set (conftest.py)."""

import pytest
import torch
import torch.nn as nn

from aviary import cpu
from aviary.cpu import Linear, products, reference_only
from aviary.cpu.threads import small_ops_on_one_thread
from aviary.loading import model_from_state_dict
from aviary.quant import Int8Linear, int8_linear_reference, quantize_int8
from aviary.testing import random_config, random_state_dict
from kernel_isas import needs


def _case(dtype, out, n_in, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g)
    w = torch.randn(out, n_in, generator=g)
    if dtype == torch.int8:
        q, scale = quantize_int8(w)
        return x, q, scale, int8_linear_reference(x.double(), q, scale.double())
    w = w.to(dtype)
    if dtype == torch.bfloat16 and cpu.bf16_rounds_x():  # the bf16 dot-product kernel rounds x as torch's does
        return x, w, None, x.bfloat16().double() @ w.double().t()
    return x, w, None, x.double() @ w.double().t()


# sizes: not multiples of 16 or 4 (tails), exactly 16, a row block split unevenly over threads, inputs
# longer than one chunk of x in the batch kernels (with and without a tail)
SHAPES = [(1, 1), (5, 7), (33, 100), (64, 16), (130, 768), (1000, 96), (44, 1000)]


DTYPES = [pytest.param(d, marks=needs[d]) for d in (torch.float32, torch.bfloat16, torch.int8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 19, 35])  # 35: two passes of the batch kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_reference(dtype, rows, shape, threads, monkeypatch):
    out, n_in = shape
    x, w, scale, ref = _case(dtype, out, n_in, rows)
    monkeypatch.setattr(products, "PARALLEL_MIN_BYTES", 0 if threads > 1 else 1 << 62)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with small_ops_on_one_thread():  # a decode step: the kernels' worker threads
            y = cpu.linear(x, w, scale)
    finally:
        torch.set_num_threads(before)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert float((y.double() - ref).abs().max()) <= tol


@needs[torch.float32]
def test_kernel_returns_the_input_dtype_and_checks_its_arguments():
    w = torch.randn(8, 4)
    assert cpu.linear(torch.randn(2, 4).bfloat16(), w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):
        cpu.linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="need a scale"):
        cpu.linear(torch.randn(2, 4), torch.zeros(8, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="take none"):
        cpu.linear(torch.randn(2, 4), w, torch.ones(8))
    with pytest.raises(ValueError, match="contiguous weight"):
        cpu.linear(torch.randn(2, 4), torch.randn(4, 8).t())
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        cpu.linear(torch.randn(2, 4), w.double())


def test_linear_is_an_nn_linear_with_the_same_gradients():
    torch.manual_seed(0)
    ref = nn.Linear(48, 40, bias=False)
    fast = Linear(48, 40, bias=False)
    fast.load_state_dict(ref.state_dict())
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 48, requires_grad=True)
    (fast(x) ** 2).sum().backward()  # needs a gradient: F.linear
    gx, gw = x.grad.clone(), fast.weight.grad.clone()
    x.grad = None
    (ref(x) ** 2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, ref.weight.grad)
    with torch.no_grad():  # the kernel (where built): same numbers
        torch.testing.assert_close(fast(x.detach()[None]), ref(x.detach()[None]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_take_the_kernel_up_to_max_rows_and_torch_beyond(dtype, monkeypatch):
    """Linear (float weights) and Int8Linear use the C kernel for up to MAX_ROWS[dtype] rows and torch's
    product past it; both give the reference's numbers."""
    torch.manual_seed(3)
    lin = nn.Linear(96, 200, bias=False)
    layer = Int8Linear.from_linear(lin) if dtype == torch.int8 else Linear(96, 200, bias=False).to(dtype)
    if dtype != torch.int8:
        layer.load_state_dict(lin.to(dtype).state_dict())
    calls = []
    real = products._run
    monkeypatch.setattr(products, "_run", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    limit = cpu.MAX_ROWS[dtype]
    for rows in (limit, limit + 1):
        x = torch.randn(rows, 96).to(torch.float32 if dtype == torch.int8 else dtype)
        with torch.no_grad():
            out = layer(x)
            with reference_only():
                ref = layer(x) if dtype != torch.int8 else int8_linear_reference(x, layer.weight_int8, layer.scale)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(out.float(), ref.float(), atol=tol * float(ref.abs().max()), rtol=0)
    assert calls == [limit]  # the kernel ran for `limit` rows only


@pytest.mark.parametrize("dtype", DTYPES[1:])  # bf16 input: bf16 weights, or int8 ones
def test_float_out_returns_the_kernels_sums_unrounded(dtype):
    """float_out=True: the kernel's float32 sums as they are; without it they are rounded to x's dtype. The
    torch path (past MAX_ROWS) returns x's dtype either way."""
    torch.manual_seed(5)
    lin = nn.Linear(64, 300, bias=False)
    layer = Int8Linear.from_linear(lin) if dtype == torch.int8 else Linear(64, 300, bias=False).to(dtype)
    if dtype != torch.int8:
        layer.load_state_dict(lin.to(dtype).state_dict())
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        y, rounded = layer(x, float_out=True), layer(x)
        big = layer(torch.randn(cpu.MAX_ROWS[dtype] + 1, 64).bfloat16(), float_out=True)
    assert y.dtype == torch.float32 and rounded.dtype == torch.bfloat16 and big.dtype == torch.bfloat16
    torch.testing.assert_close(y.bfloat16(), rounded, atol=0, rtol=0)  # the same sums, rounded once
    assert bool((y != y.bfloat16().float()).any())  # ... and not already bf16 numbers


@needs[torch.bfloat16]
def test_bf16_model_decode_logits_are_not_rounded_to_bf16():
    """A bf16 model's one-token logits are the head kernel's float32 sums: as close to the same sums in
    float64 as float32 allows, where rounding them to bf16 would be ~1e-3 of their size off."""
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=1, n_embd=64, vocab_size=500)))
    model = model.to(torch.bfloat16)
    seen = []
    model.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        logits, _ = model(torch.tensor([[3]]))
        ref = seen[0].double() @ model.head.weight.double().t()
    assert logits.dtype == torch.float32
    assert float((logits.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_int8_layer_kernels_agree():
    lin = nn.Linear(96, 70, bias=False)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(1, 3, 96)
    with torch.no_grad():
        ref = int8_linear_reference(x, layer.weight_int8, layer.scale)
        for kernel in ("aviary", "int8pack", None):
            layer.kernel = kernel
            tol = 0.05 if kernel == "int8pack" else 1e-4  # int8pack rounds x and y to bf16
            torch.testing.assert_close(layer(x), ref, atol=tol * float(ref.abs().max()), rtol=0)


# ---- input-major weights (the LoRA matrices) and `cpu.matmul` ------------------------------------

@pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs[d]) for d in (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 768), (768, 64), (100, 130)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_input_major_kernel_matches_reference(dtype, rows, shape, batch, threads, monkeypatch):
    n_in, out = shape
    g = torch.Generator().manual_seed(rows * 31 + n_in)
    x = torch.randn(batch * rows, n_in, generator=g)
    w = torch.randn(batch, n_in, out, generator=g).to(dtype)
    monkeypatch.setattr(products, "PARALLEL_MIN_BYTES", 0 if threads > 1 else 1 << 62)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with small_ops_on_one_thread():
            y = products._run(x, w, None, input_major=True, batch=batch)
    finally:
        torch.set_num_threads(before)
    ref = torch.bmm(x.double().view(batch, rows, n_in), w.double()).reshape(batch * rows, out)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


@needs[torch.bfloat16]
def test_matmul_takes_the_kernel_only_where_it_should(monkeypatch):
    calls = []
    real = products._run
    monkeypatch.setattr(products, "_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = torch.randn(32, 48)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(cpu.matmul(x, w), x @ w, atol=1e-5, rtol=1e-5)
        assert calls
        calls.clear()
        wb, xb = w.bfloat16(), x.bfloat16()
        torch.testing.assert_close(cpu.matmul(xb, wb).float(), (xb.float() @ wb.float()), atol=0.05, rtol=0.02)
        assert calls and cpu.matmul(xb, wb).dtype == torch.bfloat16
        stack = torch.randn(5, 32, 48).bfloat16()
        h = torch.randn(5, 1, 32).bfloat16()
        torch.testing.assert_close(cpu.matmul(h, stack).float(), torch.bmm(h.float(), stack.float()),
                                   atol=0.05, rtol=0.02)
        calls.clear()
        big = torch.randn(products.MATMUL_MAX_ROWS[torch.bfloat16] + 1, 32).bfloat16()
        cpu.matmul(big, wb)
        with reference_only():
            cpu.matmul(xb, wb)
        assert not calls
    xg = torch.randn(2, 32, requires_grad=True)
    cpu.matmul(xg.bfloat16(), wb).float().sum().backward()  # needs a gradient: torch's product
    assert xg.grad is not None and not calls


def test_bf16_products_past_the_kernels_widen_where_torch_has_no_bf16_matmul(monkeypatch):
    """Where torch's bf16 matmul has no bf16 instructions (AVX2 CPUs), products past the C kernels' rows
    run in float32 and are rounded once: the exact product rounded to bf16, with gradients."""
    monkeypatch.setattr(products, "TORCH_BF16_FAST", False)
    torch.manual_seed(2)
    layer = Linear(64, 96, bias=False).bfloat16()
    w = torch.randn(32, 48).bfloat16()
    x = torch.randn(200, 64).bfloat16().requires_grad_(True)
    y = layer(x)
    exact = (x.detach().double() @ layer.weight.detach().double().t()).bfloat16()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.detach().float(), exact.float(), atol=1e-2 * float(exact.float().abs().max()), rtol=0)
    y.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    h = torch.randn(100, 32).bfloat16()
    torch.testing.assert_close(cpu.matmul(h, w).float(), (h.double() @ w.double()).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_bf16_prefill_runs_in_float32_where_torch_has_no_bf16_matmul(version, monkeypatch):
    """Without torch bf16 instructions (AVX2 CPUs) a bf16 model's prefill runs in float32 activations: close
    to a float32 model holding the same bf16-rounded weights (RWKV-6/7 to float32 rounding; RWKV-4/5 compute
    a few parameter-only terms such as exp(time_decay) in bf16, measured up to 0.014), and a state the
    decode continues."""
    monkeypatch.setattr(products, "TORCH_BF16_FAST", False)
    sd = random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300))
    rounded = {k: t.bfloat16().float() for k, t in sd.items()}
    ref_model = model_from_state_dict(rounded)
    model = model_from_state_dict(rounded).bfloat16()
    toks = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ref_state = ref_model(toks)
        out, state = model(toks)
        tol = 2e-4 if version >= 6 else 3e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=1e-4)
        torch.testing.assert_close(state.wkv, ref_state.wkv, atol=tol, rtol=1e-4)
        torch.testing.assert_close(state.shift, ref_state.shift, atol=tol, rtol=1e-4)
        step, _ = model(toks[:, :1], state)  # the decode goes on from it (C blocks or torch)
        ref_step, _ = ref_model(toks[:, :1], ref_state)
    assert out.dtype == torch.float32 and bool(torch.isfinite(step).all())
    torch.testing.assert_close(step, ref_step, atol=0.1, rtol=0.05)  # the step itself computes in bf16 products


# ---- the worker pool: many threads, concurrent callers, a forked child --------------------------------

@needs[torch.float32]
@pytest.mark.parametrize("threads", [3, 5])
def test_more_threads_than_cores_still_adds_up(threads, monkeypatch):
    x, w, _, ref = _case(torch.float32, 1000, 96, 4)
    monkeypatch.setattr(products, "PARALLEL_MIN_BYTES", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with small_ops_on_one_thread():
            y = cpu.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@needs[torch.float32]
def test_concurrent_callers_get_their_own_results(monkeypatch):
    import threading

    monkeypatch.setattr(products, "PARALLEL_MIN_BYTES", 0)
    cases = [_case(torch.float32, 700, 300, rows, seed=rows) for rows in (1, 2, 5, 16)]
    errors = []

    def work(case):
        x, w, _, ref = case
        with small_ops_on_one_thread():  # (per Python thread) the kernels' worker threads
            for _ in range(50):
                if float((cpu.linear(x, w).double() - ref).abs().max()) > 1e-5 * float(ref.abs().max()):
                    errors.append("mismatch")

    threads = [threading.Thread(target=work, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs[torch.float32]
def test_a_forked_child_can_use_the_kernels(monkeypatch):
    import multiprocessing as mp

    monkeypatch.setattr(products, "PARALLEL_MIN_BYTES", 0)
    x, w, _, ref = _case(torch.float32, 500, 64, 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with small_ops_on_one_thread():
            cpu.linear(x, w)  # the parent's workers exist now
    finally:
        torch.set_num_threads(before)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        y = pool.apply_async(_child_product, (x, w)).get(timeout=60)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def _child_product(x, w):
    torch.set_num_threads(2)
    with small_ops_on_one_thread():
        return cpu.linear(x, w)
