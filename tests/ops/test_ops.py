"""Every parallel op equals its recurrent reference: outputs, final states and gradients."""

import pytest
import torch

from aviary.ops.delta import delta_rule, delta_rule_chunked, delta_rule_recurrent, delta_rule_step
from aviary.ops.gla import gla, gla_chunked, gla_recurrent, gla_step
from aviary.ops.wkv4 import empty_state, wkv4, wkv4_chunked, wkv4_recurrent

B, T, H, N = 2, 45, 3, 8  # T not a multiple of any chunk length below


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gla_inputs(strong_decay: bool, seed=0, dtype=torch.float64):
    g = _gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    # RWKV-6 decays can be very strong (log decay down to -e^3 per step) which breaks naive chunking
    scale = 3.0 if strong_decay else 1.0
    logw = -torch.exp(torch.randn(B, T, H, N, generator=g, dtype=dtype) * scale)
    u = torch.randn(H, N, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, k, v, logw, u, s0


def wkv4_inputs(seed=0, dtype=torch.float64):
    g = _gen(seed)
    C = H * N
    w = -torch.exp(torch.randn(C, generator=g, dtype=dtype))
    u = torch.randn(C, generator=g, dtype=dtype)
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * 4  # large keys stress the max-subtraction
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return w, u, k, v


def _wkv4_state_values(s):
    """(aa, bb) scaled back by e^pp: the sums themselves, independent of how they are normalised."""
    return s[:, :2] * torch.exp(s[:, 2:3])


@pytest.mark.parametrize("chunk_len", [1, 7, 16, 64])
def test_wkv4_chunked_equals_recurrent(chunk_len):
    w, u, k, v = wkv4_inputs()
    s0 = empty_state(B, k.shape[-1]).double()
    y_ref, s_ref = wkv4_recurrent(w, u, k, v, s0)
    y, s = wkv4_chunked(w, u, k, v, s0, chunk_len=chunk_len)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s[:, 2], s_ref[:, 2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_wkv4_state_values(s), _wkv4_state_values(s_ref), rtol=1e-9, atol=1e-9)


def test_wkv4_continues_from_state():
    w, u, k, v = wkv4_inputs()
    s0 = empty_state(B, k.shape[-1]).double()
    y_all, s_all = wkv4(w, u, k, v, s0)
    y1, s1 = wkv4(w, u, k[:, :20], v[:, :20], s0)
    y2, s2 = wkv4(w, u, k[:, 20:], v[:, 20:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_all, rtol=1e-10, atol=1e-10)


def test_wkv4_gradients_match_reference():
    w, u, k, v = (t.requires_grad_() for t in wkv4_inputs())
    s0 = empty_state(B, k.shape[-1]).double()
    g = torch.randn(B, T, k.shape[-1], generator=_gen(1), dtype=torch.float64)
    grads = []
    for fn in (wkv4_recurrent, wkv4_chunked):
        y, s = fn(w, u, k, v, s0)
        grads.append(torch.autograd.grad((y * g).sum(), (w, u, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("strong_decay", [False, True])
@pytest.mark.parametrize("chunk_len", [1, 8, 16, 32])
def test_gla_chunked_equals_recurrent(chunk_len, strong_decay):
    r, k, v, logw, u, s0 = gla_inputs(strong_decay)
    y_ref, s_ref = gla_recurrent(r, k, v, logw, u, s0)
    y, s = gla_chunked(r, k, v, logw, u, s0, chunk_len=chunk_len)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)


def test_gla_constant_decay_broadcasts():
    """RWKV-5 passes one decay [1, 1, H, N] for all tokens; it must equal the expanded per-token form."""
    r, k, v, logw, u, s0 = gla_inputs(False)
    const = logw[:1, :1]
    y1, s1 = gla(r, k, v, const, u, s0)
    y2, s2 = gla_recurrent(r, k, v, const.expand_as(logw), u, s0)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=1e-9)


def test_gla_gradients_match_reference():
    inputs = [t.requires_grad_() for t in gla_inputs(True)]
    go = torch.randn(B, T, H, N, generator=_gen(2), dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=_gen(3), dtype=torch.float64)
    grads = []
    for fn in (gla_recurrent, gla_chunked):
        y, s = fn(*inputs)
        grads.append(torch.autograd.grad((y * go).sum() + (s * gs).sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def delta_inputs(seed=0, dtype=torch.float64):
    g = _gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=dtype))
    logw = -0.6065 * torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=dtype))
    s0 = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, logw, k, v, -kk, kk * iclr, s0


def test_delta_rule_matches_explicit_matrix_form():
    """S_t = (diag(w) + b a^T) S_{t-1} + k v^T written with explicit matrices, one token at a time."""
    r, logw, k, v, a, b, s0 = delta_inputs()
    y, s = delta_rule_recurrent(r, logw, k, v, a, b, s0)
    S = s0
    for t in range(T):
        A = torch.diag_embed(torch.exp(logw[:, t])) + b[:, t, :, :, None] @ a[:, t, :, None, :]
        S = A @ S + k[:, t, :, :, None] @ v[:, t, :, None, :]
        torch.testing.assert_close(y[:, t], (r[:, t, :, None, :] @ S)[:, :, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, S, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
def test_delta_rule_backends_agree(backend):
    args = delta_inputs()
    y_ref, s_ref = delta_rule_recurrent(*args)
    y, s = delta_rule(*args, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_len", [1, 5, 16, 32, 64])
def test_delta_rule_chunked_equals_recurrent(chunk_len):
    args = delta_inputs()
    y_ref, s_ref = delta_rule_recurrent(*args)
    y, s = delta_rule_chunked(*args, chunk_len=chunk_len)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)


def test_delta_rule_chunked_float32_close_to_float64():
    args64 = delta_inputs()
    y_ref, s_ref = delta_rule_recurrent(*args64)
    y, s = delta_rule_chunked(*(t.float() for t in args64))
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=5e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=5e-5)


def test_delta_rule_gradients_match_reference():
    inputs = [t.requires_grad_() for t in delta_inputs()]
    go = torch.randn(B, T, H, N, generator=_gen(2), dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=_gen(3), dtype=torch.float64)
    grads = []
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        y, s = fn(*inputs)
        grads.append(torch.autograd.grad((y * go).sum() + (s * gs).sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_delta_rule_chunked_refuses_decay_outside_its_range():
    r, logw, k, v, a, b, s0 = delta_inputs()
    with pytest.raises(ValueError, match="too strong"):
        delta_rule_chunked(r, logw * 10, k, v, a, b, s0, chunk_len=64)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gla(*gla_inputs(False), backend="cuda")


@pytest.mark.parametrize("constant_decay", [False, True])
def test_gla_step_equals_recurrent_token_by_token(constant_decay):
    r, k, v, logw, u, s = gla_inputs(True)
    if constant_decay:  # RWKV-5: one [1, 1, H, K] decay broadcast over batch and time
        logw = logw[:1, :1]
    s_ref = s
    for t in range(4):
        step_args = [x[:, t:t + 1] for x in (r, k, v)] + [logw if constant_decay else logw[:, t:t + 1], u]
        y_ref, s_ref_next = gla_recurrent(*step_args, s_ref)
        y, s = gla_step(*step_args, s)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref_next, rtol=1e-10, atol=1e-10)
        s_ref = s_ref_next
    y_disp, _ = gla(*step_args, s, backend="chunked")  # the public op routes one token to the step
    torch.testing.assert_close(y_disp, gla_recurrent(*step_args, s)[0], rtol=1e-10, atol=1e-10)


def test_gla_step_gradients_match_reference():
    inputs = [x[:, :1].clone().requires_grad_() if x.dim() == 4 and x.shape[1] == T else x.clone().requires_grad_()
              for x in gla_inputs(True)]
    grads = [torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(fn(*inputs))), inputs)
             for fn in (gla_recurrent, gla_step)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_delta_rule_step_equals_recurrent_token_by_token():
    args = delta_inputs()
    s = s_ref = args[-1]
    for t in range(4):
        one = [x[:, t:t + 1] for x in args[:-1]]
        y_ref, s_ref = delta_rule_recurrent(*one, s_ref)
        y, s = delta_rule_step(*one, s)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    y_disp, s_disp = delta_rule(*one, s, backend="recurrent")
    y_ref, s_ref2 = delta_rule_recurrent(*one, s)
    torch.testing.assert_close(y_disp, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_disp, s_ref2, rtol=1e-10, atol=1e-10)


def test_delta_rule_step_gradients_match_reference():
    args = delta_inputs()
    inputs = [x[:, :1].clone().requires_grad_() for x in args[:-1]] + [args[-1].clone().requires_grad_()]
    grads = [torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(fn(*inputs))), inputs)
             for fn in (delta_rule_recurrent, delta_rule_step)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
