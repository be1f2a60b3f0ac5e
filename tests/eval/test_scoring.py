"""aviary.eval.scoring: the scores equal log-softmax of one plain forward, whatever the chunking, the
sharing of a context's state or the batching of continuations."""

from __future__ import annotations

import pytest
import torch

from aviary.eval.scoring import continuation_scores, token_losses
from eval_helpers import tiny_model


@pytest.fixture(scope="module", params=[7, 4])
def model(request):
    return tiny_model(request.param, seed=1)


def plain_log_probs(model, ids: list[int]) -> torch.Tensor:
    """[T-1] log p(ids[i+1] | ids[:i+1]) and [T-1, V] log-softmax, from one forward."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    lp = torch.log_softmax(logits[0, :-1].double(), -1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], lp


def test_token_losses_equal_one_forward_any_chunking(model):
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    want, lp = plain_log_probs(model, ids)
    for chunk_len in (3, 16, 1024):
        got = token_losses(model, ids, chunk_len=chunk_len)
        assert got.nll.dtype == torch.float64 and got.nll.shape == (39,)
        torch.testing.assert_close(got.nll, -want, atol=1e-5, rtol=0)
        assert torch.equal(got.greedy, lp.argmax(-1) == torch.tensor(ids[1:]))


def test_token_losses_continue_through_state_and_logits(model):
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    whole = token_losses(model, ids)
    head = token_losses(model, ids[:15])
    tail = token_losses(model, ids[15:], state=head.state, logits=head.logits, chunk_len=8)
    assert tail.nll.shape == (25,)
    torch.testing.assert_close(torch.cat([head.nll, tail.nll]), whole.nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(tail.state.wkv, whole.state.wkv, atol=1e-5, rtol=1e-5)
    assert token_losses(model, ids[15:], state=head.state).nll.shape == (24,)  # no logits: tokens[0] is read only


def test_progress_counts_every_token(model):
    seen = []
    token_losses(model, list(range(1, 30)), chunk_len=8, progress=seen.append)
    assert seen == [8, 8, 8, 5]


def test_continuation_scores_equal_one_forward(model):
    g = torch.Generator().manual_seed(2)
    context = torch.randint(0, 300, (12,), generator=g).tolist()
    conts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 3, 5, 3, 2)]
    # a continuation made of the model's own argmax tokens is greedy
    greedy_cont, ids = [], list(context)
    for _ in range(3):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0][0, -1].argmax())
        greedy_cont.append(nxt)
        ids.append(nxt)
    conts.append(greedy_cont)
    got = continuation_scores(model, context, conts)
    for cont, (ll, is_greedy) in zip(conts, got, strict=True):
        want, lp = plain_log_probs(model, context + cont)
        n = len(cont)
        assert ll == pytest.approx(float(want[-n:].sum()), abs=1e-5)
        assert is_greedy == bool((lp[-n:].argmax(-1) == torch.tensor(cont)).all())
    assert got[-1][1] is True
    # shared context state == each pair on its own
    alone = [continuation_scores(model, context, [c])[0] for c in conts]
    for (a, ga), (b, gb) in zip(got, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_continuation_scores_from_a_state_and_edge_cases(model):
    prefix, context, cont = [5, 6, 7], [8, 9], [10, 11]
    start = token_losses(model, prefix).state
    from_state = continuation_scores(model, context, [cont], state=start)[0][0]
    assert from_state == pytest.approx(continuation_scores(model, prefix + context, [cont])[0][0], abs=1e-5)
    assert continuation_scores(model, context, []) == []
    assert continuation_scores(model, context, [[]]) == [(0.0, True)]
    with pytest.raises(ValueError, match="empty"):
        continuation_scores(model, [], [[1]])
    with pytest.raises(ValueError, match="empty"):
        token_losses(model, [])
