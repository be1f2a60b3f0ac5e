"""The `fla` backend (aviary.ops.fla): its conversions to fla's contract, its errors, and how a model, aviary.load and
a training config choose it.

fla's kernels do not run on a CPU, so the CPU tests put a stand-in for fla in sys.modules: it implements fla's
documented contract (layout [B, T, H, K], state [N, H, K, V], chunk_rwkv6's default scale K^-0.5, log decay per
token, no final state unless asked) with its own loop, head-first inside as fla's naive references are, and checks
the shapes it is given with K != V. A transposition, a forgotten scale=1.0 or an unexpanded RWKV-5 decay then
fails. The GPU-marked tests compare the real kernels with the float64 reference."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest
import torch

import aviary.ops.fla as fla_backend
from aviary.model import RWKV
from aviary.ops import backends_of
from aviary.ops.delta import delta_rule, delta_rule_recurrent
from aviary.ops.gla import gla, gla_recurrent
from aviary.testing import random_config, random_state_dict, save_random_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (2, 13, 3, 4, 5)  # B, T, H, K, V, all different: a swapped axis changes a shape
HAS_FLA = importlib.util.find_spec("fla") is not None


def on_gpu(test):
    """GPU-marked, skipped without CUDA or without fla."""
    for mark in (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
                 pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention (pip install aviary[gpu])")):
        test = mark(test)
    return test


# ---- a stand-in for fla, by its documented contract -------------------------------------------------------------


def _check_layout(r, k, v, state, *per_token):
    b, t, h, key = r.shape
    assert k.shape == (b, t, h, key) and v.shape[:3] == (b, t, h), "fla takes [B, T, H, D]"
    for x in per_token:
        assert x.shape == (b, t, h, key), f"fla wants every per-token input as [B, T, H, K], got {tuple(x.shape)}"
    assert state.shape == (b, h, key, v.shape[-1]), "fla's state is [N, H, K, V]"
    assert all(x.is_contiguous() for x in (r, k, v, state, *per_token))


def fake_chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     **kwargs):
    assert not kwargs, f"fla removed these arguments: {kwargs}"
    _check_layout(r, k, v, initial_state, w)
    assert u.shape == r.shape[2:]
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, w = (x.transpose(1, 2) for x in (r, k, v, w))  # [B, H, T, D], as fla's naive loop
    h, outs = initial_state.clone(), []
    for t in range(q.shape[2]):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(((h + u[None, :, :, None] * kv) * (q[:, :, t, :, None] * scale)).sum(-2))
        h = h * w[:, :, t].exp()[..., None] + kv
    return torch.stack(outs, 2).transpose(1, 2), (h if output_final_state else None)


def fake_chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, **kwargs):
    assert not kwargs, f"fla removed these arguments: {kwargs}"
    _check_layout(r, k, v, initial_state, w, a, b)
    q, w, k, v, a, b = (x.transpose(1, 2) for x in (r, w, k, v, a, b))
    S, outs = initial_state.clone(), []
    for t in range(q.shape[2]):
        read = (S * a[:, :, t, :, None]).sum(-2, keepdim=True)  # a^T S, [B, H, 1, V]
        S = S * w[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :] + b[:, :, t, :, None] * read
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    return torch.stack(outs, 2).transpose(1, 2), (S if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    """fla's modules replaced by the stand-ins, and the CUDA check lifted (the stand-ins run anywhere)."""
    mods = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.rwkv6", "fla.ops.rwkv7")}
    mods["fla.ops.rwkv6"].chunk_rwkv6 = fake_chunk_rwkv6
    mods["fla.ops.rwkv7"].chunk_rwkv7 = fake_chunk_rwkv7
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(fla_backend, "_require_cuda", lambda op, *tensors: None)
    return mods


def gla_inputs(constant_decay: bool, dtype=torch.float64, shape=SHAPE):
    B, T, H, K, V = shape
    g = torch.Generator().manual_seed(0)
    r, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    shape = (1, 1, H, K) if constant_decay else (B, T, H, K)  # RWKV-5's decay is one per channel
    logw = -torch.exp(torch.randn(*shape, generator=g, dtype=dtype))
    u = torch.randn(H, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [r, k, v, logw, u, s0]


def delta_inputs(dtype=torch.float64, shape=SHAPE):
    B, T, H, K, V = shape
    g = torch.Generator().manual_seed(1)
    r, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    logw = -0.6 * torch.rand(B, T, H, K, generator=g, dtype=dtype)  # RWKV-7's range
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [r, logw, k, v, a, b, s0]


# ---- the conversions, on a CPU ----------------------------------------------------------------------------------


@pytest.mark.parametrize("constant_decay", [False, True], ids=["rwkv6", "rwkv5"])
def test_gla_fla_converts_to_fla_and_back(fake_fla, constant_decay):
    args = gla_inputs(constant_decay)
    y_ref, s_ref = gla_recurrent(*args)
    y, s = gla(*args, backend="fla")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_delta_rule_fla_converts_to_fla_and_back(fake_fla):
    args = delta_inputs()
    y_ref, s_ref = delta_rule_recurrent(*args)
    y, s = delta_rule(*args, backend="fla")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_an_fla_with_head_first_gets_head_first_false(fake_fla):
    """Older fla releases had head_first=True ([B, H, T, K]) as the default: the wrapper must say False."""
    seen = {}

    def old_chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, head_first=True):
        seen["head_first"] = head_first
        return fake_chunk_rwkv6(r, k, v, w, u, scale, initial_state, output_final_state)

    fake_fla["fla.ops.rwkv6"].chunk_rwkv6 = old_chunk_rwkv6
    gla(*gla_inputs(False), backend="fla")
    assert seen == {"head_first": False}


def test_fla_refuses_cpu_tensors_before_importing_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # importing fla would raise ImportError
    with pytest.raises(ValueError, match=r"CUDA tensors only.*pip install aviary\[gpu\].*'chunked'"):
        gla(*gla_inputs(False, dtype=torch.float32), backend="fla")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        delta_rule(*delta_inputs(dtype=torch.float32), backend="fla")


def test_missing_fla_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setattr(fla_backend, "_require_cuda", lambda op, *tensors: None)
    with pytest.raises(ImportError, match=r"pip install aviary\[gpu\]"):
        gla(*gla_inputs(False), backend="fla")
    with pytest.raises(ImportError, match=r"pip install aviary\[gpu\]"):
        delta_rule(*delta_inputs(), backend="fla")


def test_choosing_fla_imports_nothing_of_it():
    """import aviary, a model with backend="fla", a prompt refused on the CPU: fla is never imported (a CPU-only
    install has none; only a call on CUDA tensors imports it)."""
    code = ("import sys, torch; from aviary.model import RWKV; from aviary.testing import random_config\n"
            "m = RWKV(random_config(7, n_layer=1, n_embd=32, head_size=16, vocab_size=50), backend='fla')\n"
            "try:\n    m(torch.zeros(1, 4, dtype=torch.long))\nexcept ValueError as e:\n    assert 'CUDA' in str(e)\n"
            "assert not [n for n in sys.modules if n == 'fla' or n.startswith('fla.')], 'fla was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_one_token_never_reaches_fla(monkeypatch):
    """T = 1 is the decode step, whatever the backend (the fused step, tested against the reference in test_ops)."""
    monkeypatch.setitem(sys.modules, "fla", None)
    r, k, v, logw, u, s0 = gla_inputs(False, dtype=torch.float32)
    y, _ = gla(r[:, :1], k[:, :1], v[:, :1], logw[:, :1], u, s0, backend="fla")
    assert y.shape == (r.shape[0], 1, *v.shape[2:])


# ---- choosing it: a model, aviary.load, a training config ------------------------------------------------------


def test_backend_names_come_from_the_versions_op():
    assert "fla" in backends_of("gla") and "fla" in backends_of("delta_rule")
    assert "fla" not in backends_of("wkv4")
    with pytest.raises(ValueError, match=r"RWKV-4 has no 'fla' backend; choose one of recurrent, chunked"):
        RWKV(random_config(4, n_layer=1, n_embd=32, vocab_size=50), backend="fla")
    for version in (5, 6, 7):
        model = RWKV(random_config(version, n_layer=1, n_embd=32, head_size=16, vocab_size=50), backend="fla")
        assert model.backend == "fla"
    model = RWKV(random_config(7, n_layer=1, n_embd=32, head_size=16, vocab_size=50))
    with pytest.raises(ValueError, match=r"RWKV-7 has no 'cuda' backend; choose one of .*fla"):
        model.backend = "cuda"
    assert model.backend == "chunked"


@pytest.mark.parametrize("version", [5, 6, 7])
def test_model_on_fla_equals_chunked(fake_fla, version):
    """Through the whole model (RWKV-5's constant decay, RWKV-6's per-token one, RWKV-7's delta rule)."""
    config = random_config(version, n_layer=2, n_embd=32, head_size=16, vocab_size=50)
    sd = random_state_dict(config, seed=3)
    models = {}
    for backend in ("chunked", "fla"):
        models[backend] = RWKV(config, backend=backend)
        models[backend].load_state_dict(sd)
    x = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits, ref_state = models["chunked"](x)
        logits, state = models["fla"](x)
    # the time-mix runs its op in float32: the two differ by float32 rounding (the chunked form sums in chunks)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.wkv, ref_state.wkv, rtol=1e-4, atol=1e-5)


def test_load_passes_the_backend(tmp_path):
    import aviary

    for version in (4, 7):
        save_random_checkpoint(tmp_path / f"v{version}.pth", random_config(version, n_layer=1, n_embd=32,
                                                                            head_size=16, vocab_size=50))
    assert aviary.load(tmp_path / "v7.pth", backend="fla").backend == "fla"
    with pytest.raises(ValueError, match="RWKV-4 has no 'fla' backend"):
        aviary.load(tmp_path / "v4.pth", backend="fla")


def test_training_config_checks_the_backend():
    from aviary.train.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.model.version, cfg.train.backend = 4, "fla"
    with pytest.raises(ConfigError, match=r"train.backend='fla': RWKV-4 has no 'fla' backend"):
        cfg.validate()
    cfg.model.version, cfg.train.device = 7, "cpu"
    with pytest.raises(ConfigError, match=r"train.backend=fla runs on CUDA only, not train.device=cpu") as e:
        cfg.validate()
    assert "RWKV-7 has no" not in str(e.value)


def test_training_config_checks_the_triton_backend(monkeypatch):
    """train.backend=triton on a CPU is refused before anything runs, unless Triton's interpreter is on."""
    from aviary.train.config import ConfigError, TrainConfig, _backend_problems

    cfg = TrainConfig()
    cfg.model.version, cfg.train.backend, cfg.train.device = 7, "triton", "cpu"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"train.backend=triton runs on CUDA, not train.device=cpu; .*"
                                          r"TRITON_INTERPRET=1"):
        cfg.validate()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problems = _backend_problems(cfg.model, cfg.train)
    assert problems == ([] if importlib.util.find_spec("triton") else
                        ["train.backend=triton needs Triton: pip install aviary[gpu]"])


# ---- the real kernels, on a GPU ---------------------------------------------------------------------------------

# fla multiplies float32 inputs in TF32 inside a chunk (about 1e-3 relative per product): the error is measured as
# fla's own tests do, the RMS of the difference over the RMS of the float64 reference
GPU_RTOL = 1e-2


def _rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def _compare_with_grads(run_fla, run_ref, inputs):
    """Outputs, final states and the gradients of every input (the initial state included) of fla on float32 CUDA
    tensors against the reference in float64."""
    fast = [x.float().cuda().requires_grad_() for x in inputs]
    ref = [x.double().cuda().requires_grad_() for x in inputs]
    y, s = run_fla(*fast)
    y_ref, s_ref = run_ref(*ref)
    g = torch.Generator(device="cuda").manual_seed(2)
    dy, ds = torch.randn(y_ref.shape, generator=g, device="cuda"), torch.randn(s_ref.shape, generator=g, device="cuda")
    ((y * dy).sum() + (s * ds).sum()).backward()
    ((y_ref * dy.double()).sum() + (s_ref * ds.double()).sum()).backward()
    assert _rel_err(y, y_ref) < GPU_RTOL and _rel_err(s, s_ref) < GPU_RTOL
    for i, (a, b) in enumerate(zip(fast, ref, strict=True)):
        assert a.grad is not None, f"no gradient for input {i}"
        assert _rel_err(a.grad, b.grad) < GPU_RTOL, f"gradient of input {i}: {_rel_err(a.grad, b.grad):.2e}"


# RWKV's head size 64; 130 tokens: two of fla's 64-token chunks and a ragged one; 40: one partial chunk
GPU_SHAPES = pytest.mark.parametrize("shape", [(2, 130, 2, 64, 64), (1, 40, 3, 64, 64)], ids=["T130", "T40"])


@on_gpu
@GPU_SHAPES
@pytest.mark.parametrize("constant_decay", [False, True], ids=["rwkv6", "rwkv5"])
def test_gpu_gla_fla_equals_reference(constant_decay, shape):
    inputs = gla_inputs(constant_decay, shape=shape)  # RWKV-5's [1, 1, H, K] decay is a leaf, expanded inside
    _compare_with_grads(fla_backend.gla_fla, gla_recurrent, inputs)


@on_gpu
@GPU_SHAPES
def test_gpu_delta_rule_fla_equals_reference(shape):
    _compare_with_grads(fla_backend.delta_rule_fla, delta_rule_recurrent, delta_inputs(shape=shape))


@on_gpu
@pytest.mark.parametrize("version", [5, 6, 7])
def test_gpu_model_on_fla_equals_chunked(version):
    config = random_config(version, n_layer=2, n_embd=128, head_size=64, vocab_size=300)
    sd = random_state_dict(config, seed=3)
    x = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(0)).cuda()
    out = {}
    for backend in ("chunked", "fla"):
        model = RWKV(config, backend=backend)
        model.load_state_dict(sd)
        with torch.no_grad():
            out[backend] = model.cuda()(x)
    assert _rel_err(out["fla"][0], out["chunked"][0]) < GPU_RTOL
    assert _rel_err(out["fla"][1].wkv, out["chunked"][1].wkv) < GPU_RTOL

