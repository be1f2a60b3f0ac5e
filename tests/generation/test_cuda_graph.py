"""CUDA-graph decode (aviary.generation.cuda_graph): a replayed step == the eager step, in every bucket, with padding,
with an unchanged batch handed back without copies, above the largest bucket, and after a failed capture.

On a CPU the graph itself is replaced by a stand-in that records nothing and reruns the step into the same static
output (what a replay does), so everything around the graph (buckets, padding rows, the copies in and out, the
engine's use of it) is tested on every run; the GPU-marked tests capture real graphs."""

from __future__ import annotations

import pytest
import torch

from aviary.generation import Engine, SamplingParams, cuda_graph
from aviary.generation.cuda_graph import GraphDecoder
from aviary.loading import model_from_state_dict
from aviary.testing import ByteTokenizer, random_config, random_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=())


def on_gpu(test):
    """GPU-marked, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.fixture(scope="module", params=[6, 7], ids=lambda v: f"v{v}")
def model(request):
    cfg = random_config(request.param, n_layer=2, n_embd=64, head_size=32, vocab_size=257)
    return model_from_state_dict(random_state_dict(cfg, seed=3))


@pytest.fixture
def eager_graphs(monkeypatch):
    """GraphDecoder on a CPU model, its capture replaced by a rerun into the same static logits."""
    captured = []

    def capture(run):
        logits = run()
        captured.append(logits)
        return (lambda: logits.copy_(run())), logits

    monkeypatch.setattr(cuda_graph, "_require_cuda", lambda model: None)
    monkeypatch.setattr(GraphDecoder, "_capture", staticmethod(capture))
    return captured


def prefilled(model, batch: int, seed: int = 0):
    """A state after a few random tokens per row (rows differ), and the next tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, state = model(torch.randint(0, 257, (batch, 5), generator=g))
    return state, torch.randint(0, 257, (batch,), generator=g).tolist()


def eager_step(model, tokens, state):
    with torch.no_grad():
        return model(torch.tensor(tokens)[:, None], state.clone(), last_only=True, inplace=True)


def assert_same_step(got, want, tol=1e-6):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1].shift, want[1].shift, rtol=tol, atol=tol)
    torch.testing.assert_close(got[1].wkv, want[1].wkv, rtol=tol, atol=tol)


@pytest.mark.parametrize("batch, bucket", [(1, 1), (3, 4), (4, 4), (5, 8)])
def test_step_equals_eager_in_its_bucket(model, eager_graphs, batch, bucket):
    decoder = GraphDecoder(model, buckets=(1, 2, 4, 8))
    state, tokens = prefilled(model, batch)
    want = eager_step(model, tokens, state)
    assert decoder.bucket_for(batch) == bucket
    got = decoder.step(tokens, state.clone())
    assert set(decoder.graphs) == {bucket}
    assert_same_step(got, want)


def test_padding_rows_change_nothing(model, eager_graphs):
    """A bucket's padding rows hold an earlier, larger batch's rows: a smaller batch in it is still its own."""
    decoder = GraphDecoder(model, buckets=(4,))
    big, big_tokens = prefilled(model, 4, seed=1)
    decoder.step(big_tokens, big)
    small, tokens = prefilled(model, 2, seed=2)
    assert_same_step(decoder.step(tokens, small.clone()), eager_step(model, tokens, small))


def test_unchanged_batch_is_not_copied(model, eager_graphs):
    decoder = GraphDecoder(model, buckets=(4,))
    state, tokens = prefilled(model, 3)
    want = eager_step(model, tokens, state)
    want = eager_step(model, tokens, want[1])
    _, handed_back = decoder.step(tokens, state.clone())
    assert handed_back.wkv.data_ptr() == decoder.graphs[4].state.wkv.data_ptr()  # the graph's own rows
    got = decoder.step(tokens, handed_back)
    assert got[1].wkv.data_ptr() == handed_back.wkv.data_ptr()
    assert_same_step(got, want)


def test_batches_above_the_largest_bucket_run_eagerly(model, eager_graphs):
    decoder = GraphDecoder(model, buckets=(1, 2))
    state, tokens = prefilled(model, 3)
    assert decoder.bucket_for(3) is None
    assert_same_step(decoder.step(tokens, state.clone()), eager_step(model, tokens, state), tol=0)
    assert not decoder.graphs


def test_a_failed_capture_falls_back_to_eager_and_says_so(model, monkeypatch):
    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "_require_cuda", lambda model: None)
    monkeypatch.setattr(GraphDecoder, "_capture", staticmethod(broken))
    decoder = GraphDecoder(model)
    state, tokens = prefilled(model, 2)
    with pytest.warns(RuntimeWarning, match="capturing the batch-2 decode step failed.*not permitted"):
        got = decoder.step(tokens, state.clone())
    assert_same_step(got, eager_step(model, tokens, state), tol=0)
    assert decoder.eager_reason is not None and decoder.bucket_for(1) is None


def test_bad_input(model, eager_graphs):
    decoder = GraphDecoder(model)
    state, _ = prefilled(model, 2)
    with pytest.raises(ValueError, match=r"token id in \[0, 257\)"):
        decoder.step([1, 257], state)
    with pytest.raises(ValueError, match="one token id"):
        decoder.step([], state)
    with pytest.raises(ValueError, match="positive batch sizes"):
        GraphDecoder(model, buckets=(0, 4))


def test_cpu_engine_is_unchanged_and_refuses_graphs(model):
    assert Engine(model, TOK).graphs is None
    with pytest.raises(ValueError, match="CUDA-graph decode needs a model on a CUDA device"):
        Engine(model, TOK, cuda_graphs=True)


def test_engine_with_graphs_equals_engine_without(model, eager_graphs):
    """A batch that shrinks as sequences finish (buckets 4, 2, 1), and one that grows by `add` mid-way."""
    prompts = ["Hello", "The quick brown fox", "abc"]
    lengths = [2, 5, 10]

    def run(cuda_graphs):
        engine = Engine(model, TOK, cuda_graphs=cuda_graphs)
        outs = [engine.add(p, SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=()))
                for p, n in zip(prompts, lengths, strict=True)]
        engine.step()
        outs.append(engine.add("late", GREEDY))
        while engine.has_work:
            engine.step()
        return engine, outs

    plain, want = run(False)
    graphed, got = run(True)
    assert set(graphed.graphs.graphs) == {1, 2, 4}
    assert [o.tokens for o in got] == [o.tokens for o in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.final_state.wkv, b.final_state.wkv, rtol=1e-6, atol=1e-6)


# ---- real graphs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[5, 7], ids=lambda v: f"v{v}")
def gpu_model(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = random_config(request.param, n_layer=4, n_embd=256, head_size=64, vocab_size=1000)
    return model_from_state_dict(random_state_dict(cfg, seed=4)).cuda()


def gpu_prefilled(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, state = model(torch.randint(0, 1000, (batch, 7), generator=g).cuda())
    return state, torch.randint(0, 1000, (batch,), generator=g).tolist()


def gpu_eager(model, tokens, state):
    with torch.no_grad():
        return model(torch.tensor(tokens, device="cuda")[:, None], state.clone(), last_only=True, inplace=True)


@on_gpu
@pytest.mark.parametrize("batch", [4, 64])
def test_gpu_graph_step_equals_eager_step(gpu_model, batch):
    """Same batch as the bucket: the same kernels, so the same numbers (to 1e-6), over three steps."""
    decoder = GraphDecoder(gpu_model)
    state, tokens = gpu_prefilled(gpu_model, batch)
    want_state, got_state = state.clone(), state.clone()
    for _ in range(3):
        want_logits, want_state = gpu_eager(gpu_model, tokens, want_state)
        got_logits, got_state = decoder.step(tokens, got_state)
        assert_same_step((got_logits, got_state), (want_logits, want_state))
    assert set(decoder.graphs) == {batch}


@on_gpu
def test_gpu_padded_batch_is_close_to_eager(gpu_model):
    """A batch of 3 in bucket 4: another matrix kernel may run, so the two agree to float32 rounding."""
    decoder = GraphDecoder(gpu_model)
    state, tokens = gpu_prefilled(gpu_model, 3)
    assert_same_step(decoder.step(tokens, state.clone()), gpu_eager(gpu_model, tokens, state), tol=1e-4)


@on_gpu
def test_gpu_engine_uses_graphs_and_generates_the_same(gpu_model):
    assert Engine(gpu_model, TOK).graphs is not None  # the default on CUDA

    def run(cuda_graphs):
        engine = Engine(gpu_model, TOK, cuda_graphs=cuda_graphs)
        outs = [engine.add(p, GREEDY) for p in ("Hello", "The quick brown fox", "abc")]
        while engine.has_work:
            engine.step()
        assert (engine.graphs is not None) == cuda_graphs
        return [o.tokens for o in outs]

    assert run(True) == run(False)
