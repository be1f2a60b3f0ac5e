"""Whole one-token blocks in C (RWKV-4 to 7, `aviary.cpu.blocks`) against the torch blocks: in place or not,
int8 and bf16 models, parameters that change between steps, the blocks of every instruction set against each
other, and the runner that does every block of a step in one C call. Each test runs once per instruction set
(conftest.py)."""

import pytest
import torch
import torch.nn as nn

from aviary import cpu
from aviary.cpu import blocks, reference_only
from aviary.cpu.threads import small_ops_on_one_thread
from aviary.loading import model_from_state_dict
from aviary.model.rescale import apply_rescale
from aviary.testing import random_config, random_state_dict
from kernel_isas import C_ISAS, built, needs


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


@built
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


@built
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


@built
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


@built
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


@built
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


@built
def test_rescaled_rwkv6_decodes_through_its_torch_blocks(monkeypatch):
    model = model_from_state_dict(random_state_dict(random_config(6, n_layer=4, n_embd=128, vocab_size=300)))
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2]]))
        ref, _ = model(torch.tensor([[3]]), state)
        apply_rescale(model, 2)  # x halves every 2 blocks: the fused blocks do not do that
        monkeypatch.setattr(blocks, "_run", lambda *a: pytest.fail("fused blocks ran on a rescaled model"))
        out, _ = model(torch.tensor([[3]]), state)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@built
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


@built
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
