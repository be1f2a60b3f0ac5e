"""Aviary's C decode kernels against their references (F.linear, the dequantised int8 product), and the
`cpu.Linear` layer and decode thread split in whole models.

Every test here runs once for each instruction set this machine can execute (`cpu.runnable_isas()`:
AVX-512, AVX2, the portable path), so a machine with AVX-512 also tests the paths of CPUs without it."""

import pytest
import torch
import torch.nn as nn

import aviary
from aviary import cpu
from aviary.cpu import Linear, blocks, products, reference_only, steps
from aviary.cpu.threads import all_threads, small_ops_on_one_thread
from aviary.loading import model_from_state_dict
from aviary.model.rescale import apply_rescale
from aviary.quant import Int8Linear, int8_linear_reference, quantize_int8
from aviary.testing import random_config, random_state_dict, save_random_checkpoint

C_ISAS = [isa for isa in cpu.runnable_isas() if isa != "torch"]
built = pytest.mark.skipif(not C_ISAS, reason=f"aviary._kernels is not built: {cpu.build_error()}")
needs = dict.fromkeys((torch.float32, torch.bfloat16, torch.int8), built)  # every C path has all three


@pytest.fixture(autouse=True, params=C_ISAS or ["torch"])
def isa(request):
    """Each test, once per instruction set this CPU runs."""
    before = cpu.use_isa(request.param)
    yield request.param
    cpu.use_isa(before)


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


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_model_with_kernels_matches_reference_path(version):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300)))
    toks = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with reference_only():
            ref, ref_state = model(toks[:, :7])
            refs = []
            for t in range(7, 10):
                lg, ref_state = model(toks[:, t:t + 1], ref_state)
                refs.append((lg, ref_state))
        out, state = model(toks[:, :7])
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for t, (lg_ref, st_ref) in zip(range(7, 10), refs, strict=True):
            lg, state = model(toks[:, t:t + 1], state)  # one token: the kernels and the thread split
            torch.testing.assert_close(lg, lg_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.shift, st_ref.shift, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.wkv, st_ref.wkv, atol=1e-4, rtol=1e-4)


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


def test_thread_split_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with small_ops_on_one_thread():
            seen.append(torch.get_num_threads())
            with all_threads():
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        assert seen == [1, 2, 1] and torch.get_num_threads() == 2
        with pytest.raises(KeyError), small_ops_on_one_thread():
            raise KeyError("boom")
        assert torch.get_num_threads() == 2
        with all_threads():  # outside the split: changes nothing
            assert torch.get_num_threads() == 2
        model = model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=128, vocab_size=300)))
        with torch.no_grad():
            model(torch.tensor([[3]]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_split_is_off_when_a_plain_linear_is_swapped_in(tmp_path):
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=128, vocab_size=300))
    model = aviary.load(path)
    assert isinstance(model.head, Linear) and model.split_decode_threads
    model.quantize(head=False)
    assert model.split_decode_threads
    plain = nn.Linear(128, 300, bias=False)
    model.head = plain
    assert not cpu.can_split_threads(model)


@pytest.mark.parametrize("version", [5, 7])
def test_inplace_decode_equals_a_fresh_state_and_reuses_it(version):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300)))
    toks = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, fresh = model(toks[:, :3])
        owned = fresh.clone()
        shift_ptr, wkv_ptr = owned.shift.data_ptr(), owned.wkv.data_ptr()
        for t in range(3, 6):
            ref, fresh = model(toks[:, t:t + 1], fresh)
            out, same = model(toks[:, t:t + 1], owned, inplace=True)
            assert same is owned and owned.wkv.data_ptr() == wkv_ptr and owned.shift.data_ptr() == shift_ptr
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(owned.wkv, fresh.wkv, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(owned.shift, fresh.shift, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inplace"):
        model(toks[:, :1], None, inplace=True)
    grad_state = fresh.clone()
    grad_state.wkv.requires_grad_(True)
    with pytest.raises(ValueError, match="no autograd"):
        model(toks[:, :1], grad_state, inplace=True)


def test_new_states_are_laid_out_layer_by_layer():
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=3, n_embd=128, vocab_size=300)))
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2], [3, 4]]))
    assert all(state.wkv[:, i].is_contiguous() and state.shift[:, i].is_contiguous() for i in range(3))
    assert state.wkv.shape[:2] == (2, 3)


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


# ---- one-token WKV steps in C against the torch steps in aviary.ops ----------------------------------

from aviary.ops.delta import delta_rule_step  # noqa: E402
from aviary.ops.gla import gla_step  # noqa: E402

steps_built = built


def _step_inputs(B, H, K, V, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    return dict(r=rnd(B, 1, H, K), k=rnd(B, 1, H, K), v=rnd(B, 1, H, V), logw=-torch.exp(rnd(B, 1, H, K)),
                a=rnd(B, 1, H, K) * 0.2, b=rnd(B, 1, H, K) * 0.2, u=rnd(H, K), state=rnd(B, H, K, V))


def _f64(d):
    return {n: t.double() for n, t in d.items()}


@steps_built
@pytest.mark.parametrize("B,H,K,V", [(1, 1, 1, 1), (1, 12, 64, 64), (3, 2, 5, 7), (2, 3, 64, 17), (16, 4, 32, 32)])
def test_c_wkv_steps_match_the_torch_steps(B, H, K, V):
    d = _step_inputs(B, H, K, V, seed=B * 100 + K)
    assert steps.steps_available(d["state"], d["r"])
    e = _f64(d)
    with small_ops_on_one_thread():  # a decode step: (16, 4, 32, 32) is big enough for the worker threads
        _check_steps(d, e, B, H, K)
    assert d["state"].equal(_step_inputs(B, H, K, V, seed=B * 100 + K)["state"])  # the input state is untouched


def _check_steps(d, e, B, H, K):
    for lw_c, lw_ref in ((d["logw"], e["logw"]), (d["logw"][:1, :, :, :], e["logw"][:1])):  # own and broadcast
        y, S = steps.gla_step(d["r"], d["k"], d["v"], lw_c, d["u"], d["state"])
        y_ref, S_ref = gla_step(e["r"], e["k"], e["v"], lw_ref.expand(B, 1, H, K), e["u"], e["state"])
        torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(S.double(), S_ref, atol=1e-5, rtol=1e-5)
    y, S = steps.delta_rule_step(d["r"], d["logw"], d["k"], d["v"], d["a"], d["b"], d["state"])
    y_ref, S_ref = delta_rule_step(e["r"], e["logw"], e["k"], e["v"], e["a"], e["b"], e["state"])
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-5, rtol=1e-5)


@steps_built
def test_c_wkv_steps_read_strided_states_and_step_aside_when_they_should():
    d = _step_inputs(2, 3, 8, 8, seed=5)
    layers = torch.stack([d["state"], d["state"] * 2], dim=1)  # [B, L, ...]: layer 1's slice is strided
    y, S = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], layers[:, 1])
    y_ref, S_ref = gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], layers[:, 1].contiguous())
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert not steps.steps_available(d["state"].double(), d["r"].double())
    assert not steps.steps_available(d["state"].requires_grad_(True), d["r"])
    with reference_only():
        assert not steps.steps_available(layers, d["r"])


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


def test_states_from_init_cat_select_and_expand_are_layer_major():
    from aviary.state import RWKVState

    model = model_from_state_dict(random_state_dict(random_config(6, n_layer=3, n_embd=64, vocab_size=100)))
    with torch.no_grad():
        _, a = model(torch.tensor([[1, 2]]))
        _, b = model(torch.tensor([[3, 4], [5, 6]]))
    made = {"init": model.init_state(4), "cat": RWKVState.cat([a, b, a]),
            "select": RWKVState.cat([a, b]).select([2, 0]), "expand": a.expand(3)}
    for name, st in made.items():
        assert all(st.wkv[:, i].is_contiguous() and st.shift[:, i].is_contiguous() for i in range(3)), name
    torch.testing.assert_close(made["cat"].wkv, torch.cat([a.wkv, b.wkv, a.wkv]))
    torch.testing.assert_close(made["select"].wkv, torch.cat([b.wkv[1:], a.wkv]))
    torch.testing.assert_close(made["expand"].shift, a.shift.expand(3, -1, -1, -1))


@steps_built
def test_c_wkv_steps_write_into_out_even_when_it_is_the_input():
    d = _step_inputs(2, 3, 8, 8, seed=9)
    y_ref, S_ref = steps.delta_rule_step(d["r"], d["logw"], d["k"], d["v"], d["a"], d["b"], d["state"])
    state = d["state"].clone()
    y, S = steps.delta_rule_step(d["r"], d["logw"], d["k"], d["v"], d["a"], d["b"], state, out=state)
    assert S.data_ptr() == state.data_ptr()
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    state = d["state"].clone()
    y, S = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], state, out=state)
    y_ref, S_ref = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], d["state"])
    assert S.data_ptr() == state.data_ptr()
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)
    strided = torch.empty(2, 2, 3, 8, 8)[:, 0]  # not contiguous: ignored, a new tensor comes back
    _, S = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], d["state"], out=strided)
    assert S.data_ptr() != strided.data_ptr()
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_inplace_decode_of_a_batch_major_state(version):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300)))
    with torch.no_grad():
        _, st = model(torch.tensor([[1, 2], [3, 4]]))
        batch_major = type(st)(st.version, st.shift.contiguous(), st.wkv.contiguous())
        assert not batch_major.wkv[:, 1].is_contiguous()
        ref, ref_state = model(torch.tensor([[5], [6]]), st)
        out, same = model(torch.tensor([[5], [6]]), batch_major, inplace=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same.wkv, ref_state.wkv, atol=1e-5, rtol=1e-5)


# ---- RWKV-7's one-token time-mix tail in C against the module's torch path ----------------------------

@steps_built
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("head_size", [64, 24])
def test_rwkv7_tail_matches_the_time_mix(layer, head_size, monkeypatch):
    C = 192
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=C, vocab_size=50,
                                                                  head_size=head_size)))
    att = model.blocks[layer].att
    B, H, N = 3, C // head_size, head_size
    g = torch.Generator().manual_seed(layer * 7 + head_size)
    x, sx, v_first = (torch.randn(B, 1, C, generator=g) for _ in range(3))
    wkv = torch.randn(B, H, N, N, generator=g) * 0.3
    wkv_before = wkv.clone()
    calls = []
    real = steps.rwkv7_tail
    monkeypatch.setattr(steps, "rwkv7_tail", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out_state = torch.empty_like(wkv)
        y, S, vf = att(x, sx, wkv, None if layer == 0 else v_first, "recurrent", out_state)
        assert calls and S.data_ptr() == out_state.data_ptr()
        with reference_only():  # the module's torch path, the reference
            y_ref, S_ref, vf_ref = att(x, sx, wkv, None if layer == 0 else v_first, "recurrent")
    assert len(calls) == 1
    assert float(y_ref.abs().max()) > 0.1 and float((S_ref - wkv).abs().max()) > 0.01  # not trivially zero
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vf, vf_ref)
    assert torch.equal(wkv, wkv_before)  # the input state is untouched


def test_expanded_and_initial_states_are_copies_that_inplace_decode_cannot_reach(tmp_path):
    path = tmp_path / "tuned.pth"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=128, vocab_size=300), time_state=True)
    model = aviary.load(path)
    tuned = model.initial_wkv.clone()
    with torch.no_grad():
        state = model.init_state(1)
        model(torch.tensor([[1]]), state, inplace=True)
        assert torch.equal(model.initial_wkv, tuned)  # the model's state-tuned start is not the state's memory
        one = state.clone()
        copy = one.expand(1)
        model(torch.tensor([[2]]), copy, inplace=True)
        assert torch.equal(one.wkv, state.wkv) and not torch.equal(copy.wkv, one.wkv)


# ---- whole one-token blocks in C (RWKV-4 to 7) against the torch blocks ------------------------------

def _block_case(version, layer, head_size, B, quantize, batch_major, seed=0):
    C = 192
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=C, vocab_size=50,
                                                                  head_size=head_size)))
    if quantize:
        model.quantize("int8")
    g = torch.Generator().manual_seed(seed)
    x, v_first = (torch.randn(B, 1, C, generator=g) for _ in range(2))
    shift = torch.randn(B, 3, 2, C, generator=g)  # a batch-major 3-layer state: rows strided
    wkv = _random_wkv(version, (B, 3), C, head_size, g)
    if not batch_major:
        shift = shift.transpose(0, 1).contiguous().transpose(0, 1)  # layer-major: rows contiguous
        wkv = wkv.transpose(0, 1).contiguous().transpose(0, 1)
    return model, model.blocks[layer], x, shift[:, 1], wkv[:, 1], None if layer == 0 or version < 7 else v_first


def _random_wkv(version, lead, C, head_size, g):
    """A plausible random wkv state: RWKV-4's (aa, bb, pp) rows with a positive denominator bb; else heads."""
    if version == 4:
        aa, bb, pp = (torch.randn(*lead, 1, C, generator=g) for _ in range(3))
        return torch.cat([aa, bb.abs() + 0.5, pp], dim=-2)
    return torch.randn(*lead, C // head_size, head_size, head_size, generator=g) * 0.3


def _decode_block(version, block, x, shift, wkv, v_first, shift_out, wkv_out):
    """The version's one-block C path as (x, v_first) (RWKV-4/5/6 have no v_first: None), or None."""
    from aviary.model import VERSIONS

    return blocks.decode_block(VERSIONS[version].cpu_block, block, x, shift, wkv, v_first, shift_out, wkv_out)


@steps_built
@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("head_size,B", [(64, 1), (24, 3), (64, 5)])
@pytest.mark.parametrize("quantize", [False, pytest.param(True, marks=needs[torch.int8])])
@pytest.mark.parametrize("inplace", [False, True])
def test_block_matches_the_torch_block(version, layer, head_size, B, quantize, inplace):
    model, block, x, shift, wkv, v_first = _block_case(version, layer, head_size, B, quantize, batch_major=B > 1)
    shift_before, wkv_before = shift.clone(), wkv.clone()
    with torch.no_grad(), reference_only():
        x_ref, shift_ref, wkv_ref, vf_ref = block(x, shift, wkv, v_first, "recurrent")
    with torch.no_grad(), small_ops_on_one_thread():
        shift_out = shift if inplace else torch.full_like(shift, float("nan"))
        wkv_out = wkv if inplace else torch.full_like(wkv, float("nan"))
        done = _decode_block(version, block, x, shift, wkv, v_first, shift_out, wkv_out)
    assert done is not None
    x_new, vf = done
    assert float((x_ref - x).abs().max()) > 0.01 and float((wkv_ref - wkv_before).abs().max()) > 0.01
    torch.testing.assert_close(x_new, x_ref, atol=2e-5, rtol=1e-4)
    if version == 7:
        torch.testing.assert_close(vf, vf_ref, atol=0 if layer else 1e-5, rtol=0 if layer else 1e-5)
    torch.testing.assert_close(shift_out, shift_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wkv_out, wkv_ref, atol=1e-5, rtol=1e-5)
    if not inplace:  # the inputs are untouched
        assert torch.equal(shift, shift_before) and torch.equal(wkv, wkv_before)


@steps_built
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_every_instruction_set_gives_the_torch_block(version, isa):
    """The blocks on every instruction set this CPU runs (their own products, exponentials and WKV steps)
    are close to the torch block and to each other."""
    model, block, x, shift, wkv, v_first = _block_case(version, 1, 64, 3, False, batch_major=True)
    with torch.no_grad(), reference_only():
        x_ref, _, wkv_ref, _ = block(x, shift, wkv, v_first, "recurrent")
    outs = []
    for name in C_ISAS:
        cpu.use_isa(name)  # the fixture puts back its own
        with torch.no_grad(), small_ops_on_one_thread():
            shift_out, wkv_out = torch.empty_like(shift), torch.empty_like(wkv)
            x_new, _ = _decode_block(version, block, x, shift, wkv, v_first, shift_out, wkv_out)
        torch.testing.assert_close(x_new, x_ref, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(wkv_out, wkv_ref, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        outs.append(x_new)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)


@steps_built
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_block_steps_aside_where_it_cannot_run(version):
    model, block, x, shift, wkv, v_first = _block_case(version, 1, 64, 2, False, batch_major=False)
    args = (shift, wkv, v_first, shift.clone(), wkv.clone())
    with torch.no_grad():
        assert _decode_block(version, block, x, *args) is not None
        if version == 7:
            assert _decode_block(version, block, x, shift, wkv, None, *args[3:]) is None  # layer 1 needs v_first
        assert _decode_block(version, block, x.bfloat16(), *args) is None
        assert _decode_block(version, block, x[:1], *args) is None  # rows do not match the state
        many = blocks.BLOCK_MAX_ROWS + 1
        big = (torch.zeros(many, 2, 192), torch.zeros(many, *wkv.shape[1:]))
        vf = None if version < 7 else torch.zeros(many, 1, 192)
        assert _decode_block(version, block, torch.zeros(many, 1, 192), *big, vf, *big) is None
        with reference_only():
            assert _decode_block(version, block, x, *args) is None
    assert _decode_block(version, block, x, *args) is None  # autograd wanted
    with torch.no_grad():
        plain = nn.Linear(192, 192, bias=False)
        plain.weight.copy_(block.att.key.weight)
        block.att.key = plain  # a product the kernels do not own
        assert _decode_block(version, block, x, *args) is None


@steps_built
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_block_sees_parameters_that_change_after_a_step(version):
    """The block caches its parameter checks by address and version: a swapped tensor or an in-place
    update must be seen, not the old values."""
    model, block, x, shift, wkv, v_first = _block_case(version, 1, 64, 1, False, batch_major=False)
    outs = lambda: (shift.clone(), wkv.clone())  # noqa: E731
    decay = block.att.w0 if version == 7 else block.att.time_decay  # RWKV-4: [C]; 5: [H, N]; 6: [1, 1, C]
    with torch.no_grad():
        first, _ = _decode_block(version, block, x, shift, wkv, v_first, *outs())
        decay.data = decay.data + 1.0  # a new tensor at a new address
        block.ffn.value.weight.data = block.ffn.value.weight.data * 2
        second, _ = _decode_block(version, block, x, shift, wkv, v_first, *outs())
        block.ln1.weight.mul_(0.5)  # in place: same address, new version
        third, _ = _decode_block(version, block, x, shift, wkv, v_first, *outs())
        with reference_only():
            ref, *_ = block(x, shift, wkv, v_first, "recurrent")
    assert not torch.allclose(first, second) and not torch.allclose(second, third)
    torch.testing.assert_close(third, ref, atol=2e-5, rtol=1e-4)


@steps_built
@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("quantize", [False, pytest.param(True, marks=needs[torch.int8])])
def test_decode_runs_all_blocks_in_one_call(version, quantize, monkeypatch):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=3, n_embd=128, vocab_size=300)))
    if quantize:
        model.quantize("int8")
    calls = []
    real = blocks._run
    monkeypatch.setattr(blocks, "_run", lambda record, layers, *a: calls.append((len(layers), real(record, layers, *a)))
                        or calls[-1][1])
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3]]))
        assert not calls  # a prompt takes the parallel form
        with reference_only():
            ref, ref_state = model(torch.tensor([[4]]), state)
        assert all(done is None for _, done in calls)  # the reference steps aside (or never gets there)
        calls.clear()
        out, new_state = model(torch.tensor([[4]]), state)
    assert len(calls) == 1 and calls[0][0] == 3 and calls[0][1] is not None  # one call, all three layers
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_state.wkv, ref_state.wkv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_state.shift, ref_state.shift, atol=1e-5, rtol=1e-5)


@steps_built
def test_rescaled_rwkv6_decodes_through_its_torch_blocks(monkeypatch):
    model = model_from_state_dict(random_state_dict(random_config(6, n_layer=4, n_embd=128, vocab_size=300)))
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2]]))
        ref, _ = model(torch.tensor([[3]]), state)
        apply_rescale(model, 2)  # x halves every 2 blocks: the fused blocks do not do that
        monkeypatch.setattr(blocks, "_run", lambda *a: pytest.fail("fused blocks ran on a rescaled model"))
        out, _ = model(torch.tensor([[3]]), state)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@steps_built
@needs[torch.bfloat16]
@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("layer", [0, 1])
def test_block_of_a_bfloat16_model_computes_in_float32(version, layer):
    """A bf16 model's block runs in float32 on its bf16 weights, rounding only the products' inputs and
    its output x to bf16: it is closer to the float32 torch block on the same (bf16-valued) weights than
    the torch bf16 block (which rounds after every op) is, and its states are float32."""
    C = 192
    sd = random_state_dict(random_config(version, n_layer=2, n_embd=C, vocab_size=50))
    sd = {k: v.bfloat16() for k, v in sd.items()}
    model16 = model_from_state_dict(sd).to(torch.bfloat16)
    model32 = model_from_state_dict({k: v.float() for k, v in sd.items()})
    g = torch.Generator().manual_seed(layer)
    x, v_first = (torch.randn(2, 1, C, generator=g).bfloat16() for _ in range(2))
    shift, wkv = torch.randn(2, 2, C, generator=g), _random_wkv(version, (2,), C, 64, g)
    v_first = None if layer == 0 or version < 7 else v_first
    with torch.no_grad(), reference_only():
        x32, shift32, wkv32, vf32 = model32.blocks[layer](x.float(), shift, wkv,
                                                          None if v_first is None else v_first.float(), "recurrent")
        x16, shift16, wkv16, vf16 = model16.blocks[layer](x, shift, wkv, v_first, "recurrent")
    with torch.no_grad():
        shift_out, wkv_out = torch.empty_like(shift), torch.empty_like(wkv)
        x_new, vf = _decode_block(version, model16.blocks[layer], x, shift, wkv, v_first, shift_out, wkv_out)
    assert x_new.dtype == torch.bfloat16

    def err(a, b):
        return float((a.float() - b).abs().max())

    pairs = [(x_new, x16, x32), (shift_out, shift16, shift32), (wkv_out, wkv16, wkv32)]
    if version == 7:
        pairs.append((vf, vf16, vf32))
    for ours, torch16, ref in pairs:
        assert err(ours, ref) <= err(torch16, ref) + 1e-6
        assert err(ours, ref) <= 0.03 * float(ref.abs().max())


@steps_built
def test_fused_decodes_in_two_python_threads_match_one_at_a_time():
    """Two threads decoding two models at once (the pool serves one caller; the other runs its jobs alone)."""
    import threading

    models = [model_from_state_dict(random_state_dict(random_config(v, n_layer=2, n_embd=128, vocab_size=300)))
              for v in (4, 5, 6, 7)]
    toks = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))

    def decode(model, out):
        with torch.no_grad():
            _, state = model(toks[:, :2])
            for t in range(2, 12):
                logits, state = model(toks[:, t:t + 1], state, inplace=True)
                out.append(logits)

    alone = [[] for _ in models]
    for model, out in zip(models, alone, strict=True):
        decode(model, out)
    together = [[] for _ in models]
    threads = [threading.Thread(target=decode, args=(m, o)) for m, o in zip(models, together, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b) == 10
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


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
