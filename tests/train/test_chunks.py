"""`aviary.train.chunks`: a sample run in chunks that carry the recurrent state has the gradients of one pass
(`full`), or those of the same chunks with the state detached at the boundaries (`truncated`), for every
version, with the adapters' parameters and state tuning's `time_state`; the loss counts only the positions its
weights (the loss mask) keep. Small random models (L2, C64), 64 tokens as 4 chunks of 16."""

from __future__ import annotations

import pytest
import torch

from aviary.model import RWKV
from aviary.peft import PeftConfig, apply_peft
from aviary.testing import random_config, random_state_dict
from aviary.train.chunks import chunk_loss, micro_batch_backward

VOCAB, T, CHUNK, L2WRAP = 64, 64, 16, 1e-4


def make_model(version: int, method: str | None = None, dtype=torch.float64, backend="recurrent",
               dropout: float = 0.0) -> RWKV:
    """A random model, optionally with an adapter whose trainable tensors are moved away from their zero
    start, so that every gradient (LoRA's A included) is non-trivial."""
    config = random_config(version, n_layer=2, n_embd=64, vocab_size=VOCAB, head_size=16)
    model = RWKV(config, backend=backend)
    model.load_state_dict(random_state_dict(config, seed=version))
    if method is not None:
        apply_peft(model, PeftConfig(method, rank=4, alpha=8.0, dropout=dropout), seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(dtype).train()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and loss weights [2, T]: about a third of the positions masked off, the rest weighing
    1 / (number kept), as the training loop normalises them."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, VOCAB, (2, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g)
    keep = (torch.rand(2, T, generator=g) > 0.35).float()
    return x, y, keep / keep.sum()


def forward_of(model: RWKV):
    return lambda x, state, last_only: model(x, state, last_only=last_only)


def gradients(model: RWKV, run) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    run()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-12, f"gradient of {name}: max error {err:.2e}"


@pytest.mark.parametrize("version, method", [(4, None), (5, None), (6, None), (7, None), (4, "lora"), (7, "miss"),
                                             (5, "state"), (6, "state"), (7, "state")])
def test_full_chunks_give_the_gradients_of_one_pass(version, method):
    """float64 weights; the recurrent ops, which carry their float32 state token by token, so that chunking
    changes no arithmetic but the float32 token-shift state at the boundaries (the model keeps it float32)."""
    model = make_model(version, method)
    x, y, w = batch()
    fwd = forward_of(model)
    one = gradients(model, lambda: micro_batch_backward(fwd, x, y, w, l2wrap=L2WRAP))
    full = gradients(model, lambda: micro_batch_backward(fwd, x, y, w, chunk_len=CHUNK, mode="full", l2wrap=L2WRAP))
    assert_same_gradients(full, one, rel=1e-6)
    if method == "state":
        assert set(one) == {f"blocks.{i}.att.time_state" for i in range(2)}
    elif method is None:
        assert len(one) > 20  # every weight (v7 layer 0's unused v0/v1/v2 aside)


@pytest.mark.parametrize("version, method", [(5, "lora"), (7, "state")])
def test_truncated_chunks_give_the_gradients_of_detached_states(version, method):
    """The reference by hand: the same chunks in one graph, the state detached between them, one backward."""
    model = make_model(version, method, dtype=torch.float32, backend="chunked")
    x, y, w = batch(1)

    def reference():
        state, total = None, 0
        for s in range(0, T, CHUNK):
            logits, state = model(x[:, s:s + CHUNK], state)
            total = total + chunk_loss(logits, y[:, s:s + CHUNK], w[:, s:s + CHUNK], L2WRAP)
            state = state.detach()
        total.backward()

    want = gradients(model, reference)
    got = gradients(model, lambda: micro_batch_backward(forward_of(model), x, y, w, chunk_len=CHUNK,
                                                        mode="truncated", l2wrap=L2WRAP))
    assert_same_gradients(got, want, rel=1e-6)
    full = gradients(model, lambda: micro_batch_backward(forward_of(model), x, y, w, chunk_len=CHUNK, mode="full",
                                                         l2wrap=L2WRAP))
    name = next(iter(want))
    assert (full[name] - want[name]).abs().max() > 1e-3 * want[name].abs().max()  # the modes do differ


def test_full_chunks_rerun_with_the_same_dropout():
    """LoRA dropout: the recomputed chunks draw the masks of the first pass, so the gradients are those of
    one graph through all chunks (state not detached) run from the same generator state."""
    model = make_model(7, "lora", dropout=0.5)
    x, y, w = batch(2)

    def reference():
        torch.manual_seed(3)
        state, total = None, 0
        for s in range(0, T, CHUNK):
            logits, state = model(x[:, s:s + CHUNK], state)
            total = total + chunk_loss(logits, y[:, s:s + CHUNK], w[:, s:s + CHUNK], L2WRAP)
        total.backward()

    def full():
        torch.manual_seed(3)
        micro_batch_backward(forward_of(model), x, y, w, chunk_len=CHUNK, mode="full", l2wrap=L2WRAP)

    assert_same_gradients(gradients(model, full), gradients(model, reference), rel=1e-9)


def test_the_loss_ignores_masked_positions():
    """Targets at masked-off positions change neither the loss nor any gradient; the loss is the masked mean
    cross-entropy, and a micro-batch without targets has loss 0 and zero gradients (no NaN)."""
    model = make_model(6, dtype=torch.float32, backend="chunked")
    x, y, w = batch(3)
    fwd = forward_of(model)
    loss = torch.zeros(())
    a = gradients(model, lambda: loss.copy_(micro_batch_backward(fwd, x, y, w, chunk_len=CHUNK, l2wrap=L2WRAP)))
    other = torch.where(w > 0, y, (y + 7) % VOCAB)
    b = gradients(model, lambda: micro_batch_backward(fwd, x, other, w, chunk_len=CHUNK, l2wrap=L2WRAP))
    assert all(torch.equal(a[n], b[n]) for n in a)
    with torch.no_grad():
        logits, _ = model(x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(2, T)
    torch.testing.assert_close(loss, ce[w > 0].mean(), rtol=1e-5, atol=0)
    zero = torch.zeros_like(w)
    model.zero_grad(set_to_none=True)
    assert micro_batch_backward(fwd, x, y, zero, chunk_len=CHUNK, mode="full", l2wrap=L2WRAP).item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)
