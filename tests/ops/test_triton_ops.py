"""The "triton" backend (aviary.ops.triton, Aviary's own kernels) equals the recurrent references: outputs,
final states, and the gradients of every input and of the initial state.

Without a CUDA device the kernels run on the CPU under Triton's interpreter: TRITON_INTERPRET=1 is set below,
before the kernel modules are imported (which is when Triton reads it), so CI checks them on every run; one test
also compiles them for a GPU. The reference runs in float64 on the same (rounded) values. Tolerances (float32):
outputs and states within 1e-4, gradients within 1e-3 of each gradient's largest entry. bfloat16 inputs (computed
in float32, outputs and gradients returned in bfloat16, which rounds by up to 0.4%): outputs and gradients within
1e-2 of their largest entry. `assert_match` has the details. Without Triton these tests skip, except the one
that checks that a CPU-only install never needs it.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from aviary.ops.delta import delta_rule, delta_rule_recurrent
from aviary.ops.gla import gla, gla_recurrent
from aviary.ops.wkv4 import empty_state, wkv4, wkv4_recurrent

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytestmark = pytest.mark.usefixtures("one_torch_thread")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install aviary[gpu])")

B, H, N = 2, 2, 16  # batch, heads, head size (K = V = N); RWKV-4 channels = H * N
F32_STATE = 1e-4  # outputs and states, float32
F32_GRAD = 1e-3  # gradients, relative to each gradient's largest entry
BF16 = 1e-2  # bfloat16 outputs and gradients, relative to the largest entry


@pytest.fixture(scope="module")
def device():
    """cuda where there is one, else the CPU under Triton's interpreter."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install aviary[gpu])")
    if torch.cuda.is_available():
        return "cuda"
    import triton

    from aviary.ops.triton.gla import _gla_fwd

    if isinstance(_gla_fwd, triton.runtime.JITFunction):
        pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set (another test imported "
                    "them first): run tests/ops/test_triton_ops.py on its own")
    return "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def gla_inputs(T, seed=0, batch=B, heads=H, n=N, n_v=None):
    g = _gen(seed)
    r, k = (torch.randn(batch, T, heads, n, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, T, heads, n_v or n, generator=g, dtype=torch.float64)
    # RWKV-6's data-dependent decay: log w from about -0.01 down to -10, where e^{c} products would underflow
    logw = -torch.exp(torch.randn(batch, T, heads, n, generator=g, dtype=torch.float64) * 1.5).clamp(max=10)
    logw[:, :, :, 0] = -10.0
    u = torch.randn(heads, n, generator=g, dtype=torch.float64)
    s0 = torch.randn(batch, heads, n, n_v or n, generator=g, dtype=torch.float64)
    return [r, k, v, logw, u, s0]


def delta_inputs(T, seed=0, batch=B, heads=H, n=N, n_v=None):
    g = _gen(seed)
    r, k = (torch.randn(batch, T, heads, n, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, T, heads, n_v or n, generator=g, dtype=torch.float64)
    kk = torch.nn.functional.normalize(torch.randn(batch, T, heads, n, generator=g, dtype=torch.float64), dim=-1)
    iclr = torch.sigmoid(torch.randn(batch, T, heads, n, generator=g, dtype=torch.float64))
    logw = -0.6065 * torch.sigmoid(torch.randn(batch, T, heads, n, generator=g, dtype=torch.float64))
    logw[:, :, :, 0] = -10.0  # far past RWKV-7's clamp: the kernel needs none
    s0 = torch.randn(batch, heads, n, n_v or n, generator=g, dtype=torch.float64)
    return [r, logw, k, v, -kk, kk * iclr, s0]


def wkv4_inputs(T, seed=0, batch=B, channels=H * N, empty=False):
    g = _gen(seed)
    w = -torch.exp(torch.randn(channels, generator=g, dtype=torch.float64))
    u = torch.randn(channels, generator=g, dtype=torch.float64)
    k = torch.randn(batch, T, channels, generator=g, dtype=torch.float64) * 4  # large keys stress the max trick
    v = torch.randn(batch, T, channels, generator=g, dtype=torch.float64)
    if empty:
        s0 = empty_state(batch, channels).double()
    else:  # aa any sign, bb > 0 (a sum of positive weights), pp a log scale
        s0 = torch.stack([torch.randn(batch, channels, generator=g, dtype=torch.float64),
                          torch.rand(batch, channels, generator=g, dtype=torch.float64) + 0.5,
                          torch.randn(batch, channels, generator=g, dtype=torch.float64) * 3], dim=1)
    return [w, u, k, v, s0]


def _loss_weights(y, s, seed=1):
    g = _gen(seed)
    return (torch.randn(y.shape, generator=g, dtype=torch.float64),
            torch.randn(s.shape, generator=g, dtype=torch.float64))


def compare(reference, kernel, inputs, device, dtype=torch.float32, **kernel_kwargs):
    """The float64 reference and the kernel on the same values (the inputs rounded to `dtype`, the initial state
    to float32): both outputs, final states, and the gradients of a random weighting of both for every input."""
    *args, s0 = inputs
    args, s0 = [x.to(dtype).double() for x in args], s0.float().double()
    ref_in = [x.clone().requires_grad_() for x in (*args, s0)]
    y_ref, s_ref = reference(*ref_in)
    go, gs = _loss_weights(y_ref, s_ref)
    grads_ref = torch.autograd.grad((y_ref * go).sum() + (s_ref * gs).sum(), ref_in)
    dev_in = [x.to(device, dtype).requires_grad_() for x in args] + [s0.to(device, torch.float32).requires_grad_()]
    y, s = kernel(*dev_in, **kernel_kwargs)
    assert y.dtype == dtype and s.dtype == torch.float32
    loss = (y.double() * go.to(device)).sum() + (s.double() * gs.to(device)).sum()
    grads = torch.autograd.grad(loss, dev_in)
    return (y.double().cpu(), s.double().cpu(), [g.double().cpu() for g in grads]), (y_ref, s_ref, grads_ref)


def assert_relative(got, want, tol, name):
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= tol * scale + 1e-12, f"{name}: max error {err:.3g} > {tol} x max |{name}| {scale:.3g}"


def assert_match(got, want, names, dtype=torch.float32):
    """Outputs and final states within 1e-4 (float32: absolute and relative, the absolute part scaled by the
    largest entry when that is above 1, as long sums on a GPU round in proportion to their terms) or outputs
    within 1% of their largest entry (bfloat16; the state stays float32); each gradient within 1e-3 (float32)
    or 1% (bfloat16) of its largest entry."""
    (y, s, grads), (y_ref, s_ref, grads_ref) = got, want
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=F32_STATE, atol=F32_STATE * max(1.0, y_ref.abs().max().item()))
    else:
        assert_relative(y, y_ref, BF16, "y")
    torch.testing.assert_close(s, s_ref, rtol=F32_STATE, atol=F32_STATE * max(1.0, s_ref.abs().max().item()))
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert torch.isfinite(g).all(), name
        assert_relative(g, g_ref, F32_GRAD if dtype == torch.float32 else BF16, f"d{name}")


def _kernel(name):
    import aviary.ops.triton as kernels

    return getattr(kernels, name)


SHAPES = [(1, 8), (7, 8), (33, 8), (33, 16)]  # (T, chunk_len): one token, shorter than a chunk, a ragged end


@requires_triton
@pytest.mark.parametrize("T,chunk_len", SHAPES)
def test_gla_triton_matches_reference(device, T, chunk_len):
    got, want = compare(gla_recurrent, _kernel("gla_triton"), gla_inputs(T), device, chunk_len=chunk_len)
    assert_match(got, want, ["r", "k", "v", "logw", "u", "state"])


@requires_triton
def test_gla_triton_constant_decay_broadcasts(device):
    """RWKV-5 passes one decay [1, 1, H, K]; its gradient is the sum over batch and time."""
    inputs = gla_inputs(7)
    inputs[3] = inputs[3][:1, :1]
    got, want = compare(gla_recurrent, _kernel("gla_triton"), inputs, device, chunk_len=4)
    assert got[2][3].shape == (1, 1, H, N)
    assert_match(got, want, ["r", "k", "v", "logw", "u", "state"])


@requires_triton
@pytest.mark.parametrize("T,chunk_len", SHAPES)
def test_delta_rule_triton_matches_reference(device, T, chunk_len):
    got, want = compare(delta_rule_recurrent, _kernel("delta_rule_triton"), delta_inputs(T), device,
                        chunk_len=chunk_len)
    assert_match(got, want, ["r", "logw", "k", "v", "a", "b", "state"])


@requires_triton
@pytest.mark.parametrize("T,chunk_len", SHAPES)
def test_wkv4_triton_matches_reference(device, T, chunk_len):
    got, want = compare(wkv4_recurrent, _kernel("wkv4_triton"), wkv4_inputs(T), device, chunk_len=chunk_len)
    assert_match(got, want, ["w", "u", "k", "v", "state"])


@requires_triton
def test_wkv4_triton_from_the_empty_state(device):
    """pp = -1e30: every term read from the state is e^{-1e30 - p} = 0, and so is its gradient."""
    got, want = compare(wkv4_recurrent, _kernel("wkv4_triton"), wkv4_inputs(9, empty=True), device, chunk_len=4)
    assert_match(got, want, ["w", "u", "k", "v", "state"])


@requires_triton
@pytest.mark.parametrize("op", ["wkv4", "gla", "delta_rule"])
def test_triton_sizes_that_fill_no_block(device, op):
    """K = 12 (a padded key block) and V = 40 (two value blocks, the second part padding), whose key-sized
    gradients are partial sums added afterwards; RWKV-4 with 200 channels (two blocks of 128)."""
    reference, inputs, names = {
        "wkv4": (wkv4_recurrent, wkv4_inputs(6, channels=200), ["w", "u", "k", "v", "state"]),
        "gla": (gla_recurrent, gla_inputs(6, n=12, n_v=40), ["r", "k", "v", "logw", "u", "state"]),
        "delta_rule": (delta_rule_recurrent, delta_inputs(6, n=12, n_v=40), ["r", "logw", "k", "v", "a", "b", "state"]),
    }[op]
    got, want = compare(reference, _kernel(f"{op}_triton"), inputs, device, chunk_len=4)
    assert_match(got, want, names)


@requires_triton
@pytest.mark.parametrize("op", ["wkv4", "gla", "delta_rule"])
def test_triton_bfloat16_inputs(device, op):
    """bfloat16 in and out, float32 inside: the reference gets the same rounded inputs."""
    reference, inputs, names = {
        "wkv4": (wkv4_recurrent, wkv4_inputs(7), ["w", "u", "k", "v", "state"]),
        "gla": (gla_recurrent, gla_inputs(7), ["r", "k", "v", "logw", "u", "state"]),
        "delta_rule": (delta_rule_recurrent, delta_inputs(7), ["r", "logw", "k", "v", "a", "b", "state"]),
    }[op]
    got, want = compare(reference, _kernel(f"{op}_triton"), inputs, device, dtype=torch.bfloat16, chunk_len=4)
    assert_match(got, want, names, dtype=torch.bfloat16)


@requires_triton
def test_backend_name_dispatches_to_the_kernels(device):
    """backend="triton" in each op's table; without a gradient the forward saves no chunk states and gives the
    same result."""
    cases = [(wkv4, wkv4_recurrent, wkv4_inputs(5)), (gla, gla_recurrent, gla_inputs(5)),
             (delta_rule, delta_rule_recurrent, delta_inputs(5))]
    for op, reference, inputs in cases:
        with torch.no_grad():
            y, s = op(*(x.float().to(device) for x in inputs), backend="triton")
        y_ref, s_ref = reference(*inputs)
        torch.testing.assert_close(y.double().cpu(), y_ref, rtol=F32_STATE, atol=F32_STATE)
        torch.testing.assert_close(s.double().cpu(), s_ref, rtol=F32_STATE, atol=F32_STATE)


@requires_triton
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_whole_model_with_the_triton_backend(device, version):
    """model.backend = "triton" gives the chunked backend's logits, final state and weight gradients."""
    from aviary.model import RWKV
    from aviary.testing import random_config, random_state_dict

    config = random_config(version, n_layer=1, n_embd=32, head_size=16, vocab_size=40)
    model = RWKV(config).to(device)
    model.load_state_dict(random_state_dict(config, seed=version))
    tokens = torch.randint(0, 40, (2, 9), generator=_gen(version)).to(device)
    results = []
    for backend in ("chunked", "triton"):
        model.backend = backend
        model.zero_grad()
        logits, state = model(tokens)
        (logits.square().mean() + state.wkv.square().mean()).backward()
        # v7's layer 0 makes v_first and leaves its v0, v1, v2 unused: no gradient there
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        results.append((logits.detach(), state.wkv.detach(), grads))
    (logits_ref, wkv_ref, grads_ref), (logits, wkv, grads) = results
    torch.testing.assert_close(logits, logits_ref, rtol=F32_STATE, atol=F32_STATE)
    torch.testing.assert_close(wkv, wkv_ref, rtol=F32_STATE, atol=F32_STATE)
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref, strict=True):
        assert_relative(g, g_ref, F32_GRAD, f"d{name}")


@requires_triton
def test_triton_bad_input_is_a_clear_error(device):
    gla_triton = _kernel("gla_triton")
    r, k, v, logw, u, s0 = (x.float().to(device) for x in gla_inputs(3))
    with pytest.raises(ValueError, match=r"state has shape \(2, 2, 16, 8\), expected \(2, 2, 16, 16\)"):
        gla_triton(r, k, v, logw, u, s0[..., :8])
    with pytest.raises(ValueError, match=r"r must have 4 dimensions, got shape \(3, 2, 16\)"):
        gla_triton(r[0], k, v, logw, u, s0)
    with pytest.raises(ValueError, match="logw has shape"):
        gla_triton(r, k, v, logw[:, :1], u, s0)
    with pytest.raises(ValueError, match="chunk_len must be a positive integer"):
        gla_triton(r, k, v, logw, u, s0, chunk_len=0)
    with pytest.raises(ValueError, match="several devices"):
        gla_triton(r, k, v, logw, u, s0.to("meta"))
    w, u, k, v, s0 = (x.float().to(device) for x in wkv4_inputs(3))
    with pytest.raises(ValueError, match="k must be a floating-point tensor"):
        _kernel("wkv4_triton")(w, u, k.long(), v, s0)


@requires_triton
def test_triton_refuses_cpu_tensors_when_compiled():
    """Outside the interpreter a kernel needs CUDA tensors: a clear error rather than Triton's."""
    import triton

    from aviary.ops.triton._launch import check_inputs

    def kernel():
        pass

    with pytest.raises(ValueError, match="need a CUDA device"):
        check_inputs("gla", triton.runtime.JITFunction(kernel), 16, r=torch.zeros(1))


def _run_python(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


COMPILE_ALL = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from aviary.ops.triton import delta, gla, wkv4
head = dict(H=4, K=64, V=64, BK=64, BV=32, C=32)  # a model's head size, two value blocks
for fn, constants in [(gla._gla_fwd, dict(head, SAVE=True)), (gla._gla_bwd, head),
                      (delta._delta_fwd, dict(head, SAVE=True)), (delta._delta_bwd, head),
                      (wkv4._wkv4_fwd, dict(CH=768, BC=128, C=64, SAVE=True)),
                      (wkv4._wkv4_bwd, dict(CH=768, BC=128, C=64))]:
    signature = {p.name: "constexpr" if p.is_constexpr else "*fp32" if p.name.endswith("_ptr") else "i32"
                 for p in fn.params}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], fn.__name__
    print(fn.__name__, "compiled")
"""


@requires_triton
def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter runs the kernels as Python, so it accepts code that Triton's compiler would not: compile
    every kernel for sm_90 (Hopper) all the way to a cubin (Triton ships ptxas; no GPU or driver needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")  # a fresh cache: really compile
    result = _run_python(COMPILE_ALL, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 6


def test_a_cpu_only_install_never_needs_triton():
    """`import aviary` (ops included) never loads Triton, and asking for the backend without Triton says what to
    install. One subprocess, where Triton is then made unimportable."""
    code = ("import sys, aviary, aviary.ops, aviary.ops.triton\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n"
            "sys.modules['triton'] = None  # as if Triton were not installed\n"
            "import torch\nfrom aviary.ops.gla import gla\n"
            "x = torch.zeros(1, 2, 1, 4)\n"
            "try:\n    gla(x, x, x, x, torch.zeros(1, 4), torch.zeros(1, 1, 4, 4), backend='triton')\n"
            "except ImportError as e:\n    print(e)\n")
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    imported, error = result.stdout.strip().split("\n")
    assert imported == "[]"
    assert "the 'triton' backend needs Triton" in error and "pip install aviary[gpu]" in error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@requires_triton
@pytest.mark.parametrize("op", ["wkv4", "gla", "delta_rule"])
def test_triton_on_cuda_at_model_sizes(op):
    """Compiled kernels on a GPU at a model's head size: 64 x 64 state tiles split into value blocks, several
    chunks and a ragged end."""
    T, chunk_len = 200, 32
    reference, inputs, names = {
        "wkv4": (wkv4_recurrent, wkv4_inputs(T, batch=3, channels=320), ["w", "u", "k", "v", "state"]),
        "gla": (gla_recurrent, gla_inputs(T, batch=3, heads=4, n=64), ["r", "k", "v", "logw", "u", "state"]),
        "delta_rule": (delta_rule_recurrent, delta_inputs(T, batch=3, heads=4, n=64),
                       ["r", "logw", "k", "v", "a", "b", "state"]),
    }[op]
    got, want = compare(reference, _kernel(f"{op}_triton"), inputs, "cuda", chunk_len=chunk_len)
    assert_match(got, want, names)
