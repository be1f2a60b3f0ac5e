"""Generation: batched == one by one, streaming == non-streaming, cached prefix == recompute, saved state ==
live state, stop strings across token boundaries, seeds, and the reference pipeline's penalties."""

import os
import sys
import warnings

import pytest
import torch

from aviary.generation import Engine, GenerationError, SamplingParams, StateCache, generate, stream
from aviary.loading import model_from_state_dict
from aviary.state import RWKVState
from aviary.testing import ByteTokenizer, random_config, random_state_dict

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=())


@pytest.fixture(scope="module", params=[6, 7], ids=lambda v: f"v{v}")
def model(request):
    cfg = random_config(request.param, n_layer=2, n_embd=64, head_size=32, vocab_size=257)
    return model_from_state_dict(random_state_dict(cfg, seed=3))


PROMPTS = ["Hello", "The quick brown fox jumps", "é", "a much longer prompt that spans several words and bytes"]


def test_batch_equals_one_by_one(model):
    batch = generate(model, TOK, PROMPTS, GREEDY)
    singles = [generate(model, TOK, p, GREEDY) for p in PROMPTS]
    assert batch == singles
    assert all(len(t) <= 12 for t in batch)  # 12 tokens, at most one character each


def test_streaming_equals_non_streaming(model):
    text = generate(model, TOK, "Hello", GREEDY)
    assert "".join(stream(model, TOK, "Hello", GREEDY)) == text
    pieces = {i: "" for i in range(len(PROMPTS))}
    for i, piece in stream(model, TOK, PROMPTS, GREEDY):
        pieces[i] += piece
    assert list(pieces.values()) == generate(model, TOK, PROMPTS, GREEDY)


def test_keyword_overrides_and_length_limit(model):
    out = Engine(model, TOK)
    seq = out.add("Hi", SamplingParams(temperature=0, max_new_tokens=5, stop_token_ids=()))
    while out.has_work:
        out.step()
    assert len(seq.tokens) == 5 and seq.finish_reason == "length"
    assert generate(model, TOK, "Hi", GREEDY, max_new_tokens=5) == TOK.decode(seq.tokens)


def test_sequence_joining_mid_batch_matches_running_alone(model):
    alone = generate(model, TOK, "late joiner", GREEDY)
    engine = Engine(model, TOK)
    first = engine.add("early", GREEDY)
    engine.step()
    engine.step()
    late = engine.add("late joiner", GREEDY)
    assert engine.batch_size == 2
    while engine.has_work:
        engine.step()
    assert late.text == alone
    assert first.text == generate(model, TOK, "early", GREEDY)


def test_finished_sequences_leave_the_batch(model):
    engine = Engine(model, TOK)
    engine.add("a", GREEDY.__class__(temperature=0, max_new_tokens=2, stop_token_ids=()))
    engine.add("b", GREEDY)
    sizes = []
    while engine.has_work:
        engine.step()
        sizes.append(engine.batch_size)
    assert sizes[1] == 1 and sizes[-1] == 0


def test_cached_prefix_gives_the_same_continuation(model):
    system = "System: you are a helpful bird.\n\n"
    prompt = system + "User: hi\n\nAssistant:"
    fresh = generate(model, TOK, prompt, GREEDY)
    cache = StateCache()
    engine = Engine(model, TOK, cache=cache)
    engine.prefill(TOK.encode(system))
    seq = engine.add(prompt, GREEDY)
    while engine.has_work:
        engine.step()
    assert seq.cached_tokens == len(TOK.encode(system))
    assert seq.text == fresh
    # the whole prompt is now cached too: a repeat starts from its state and logits, with no model call
    again = Engine(model, TOK, cache=cache).add(prompt, GREEDY)
    assert again.cached_tokens == len(TOK.encode(prompt))


def test_saved_and_reloaded_state_continues_identically(model, tmp_path):
    engine = Engine(model, TOK)
    _, state, _ = engine.prefill(TOK.encode("User: remember the number 7.\n\n"))
    live = generate(model, TOK, "Assistant:", GREEDY, state=state)
    state.save(tmp_path / "chat.state")
    loaded = RWKVState.load(tmp_path / "chat.state")
    assert generate(model, TOK, "Assistant:", GREEDY, state=loaded) == live


def test_final_state_covers_prompt_and_generated_tokens(model):
    engine = Engine(model, TOK)
    seq = engine.add("Hello", GREEDY)
    while engine.has_work:
        engine.step()
    _, state = model(torch.tensor([TOK.encode("Hello") + seq.tokens]))
    torch.testing.assert_close(seq.final_state.wkv, state.wkv, atol=1e-4, rtol=1e-4)


def test_seed_makes_sampling_reproducible(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=1234, stop_token_ids=())
    a = generate(model, TOK, ["x", "y"], params)
    assert a == generate(model, TOK, ["x", "y"], params)
    assert generate(model, TOK, "x", params) == a[0]  # the batch does not change a sequence's draws
    others = {generate(model, TOK, "x", params, seed=s) for s in range(5)}
    assert len(others) > 1


def test_bad_requests_get_clear_errors(model):
    with pytest.raises(GenerationError, match="empty"):
        generate(model, TOK, "", GREEDY)
    with pytest.raises(GenerationError, match="outside"):
        Engine(model, TOK).add([5, 999], GREEDY)
    with pytest.raises(ValueError, match="banned_tokens"):
        generate(model, TOK, "x", GREEDY, banned_tokens=(400,))
    with pytest.raises(ValueError, match="another model|batch"):
        wrong = model.init_state(2)
        generate(model, TOK, "x", GREEDY, state=wrong)


# ---- a scripted model: emits a fixed token sequence, for exact stop-string and UTF-8 tests ----------


class ScriptedModel(torch.nn.Module):
    """Logits that pick `script[position]` (then end of document); the position is kept in the state."""

    def __init__(self, script, vocab_size=257):
        super().__init__()
        self.script = list(script)
        self.config = random_config(7, vocab_size=vocab_size)

    device = torch.device("cpu")  # what the engine reads (RWKV.device)

    def init_state(self, batch_size=1):
        return RWKVState(7, torch.zeros(batch_size, 1, 2, 1), torch.zeros(batch_size, 1, 1, 1, 1))

    def check_state(self, state, batch_size):
        assert state.batch_size == batch_size

    def forward(self, tokens, state=None, last_only=False, inplace=False):  # may ignore inplace: the engine
        # keeps the state it gets back
        B, T = tokens.shape
        state = state if state is not None else self.init_state(B)
        pos = state.shift[:, 0, 0, 0] + T
        logits = torch.zeros(B, 1, self.config.vocab_size)
        for b in range(B):
            gen = int(pos[b]) - self.prompt_len
            logits[b, 0, self.script[gen] if 0 <= gen < len(self.script) else 0] = 50.0
        shift = state.shift.clone()
        shift[:, 0, 0, 0] = pos
        return logits, RWKVState(7, shift, state.wkv)


def scripted(text, prompt="P"):
    m = ScriptedModel(TOK.encode(text))
    m.prompt_len = len(TOK.encode(prompt))
    return m


@pytest.mark.parametrize("stop", ["\n\nUser", "User:", "ser", "\n"])
def test_stop_strings_across_token_boundaries(stop):
    text = "Sure, here it is.\n\nUser: next"
    m = scripted(text)
    params = SamplingParams(temperature=0, max_new_tokens=100, stop=(stop, "never"))
    full = generate(m, TOK, "P", params)
    assert full == text[:text.index(stop)]
    assert "".join(stream(m, TOK, "P", params)) == full  # nothing of the stop string leaks out while streaming


def test_stream_yields_only_whole_characters():
    text = "héllo 😀 世界"
    pieces = list(stream(scripted(text), TOK, "P", SamplingParams(temperature=0, max_new_tokens=100)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(text)  # one piece per character, though 😀 is four tokens


def test_stop_token_ends_without_text():
    out = Engine(scripted("ab"), TOK)
    seq = out.add("P", SamplingParams(temperature=0, max_new_tokens=100))
    while out.has_work:
        out.step()
    assert seq.text == "ab" and seq.finish_reason == "stop" and seq.tokens == TOK.encode("ab")


def test_step_emits_its_text_before_the_forward():
    """`step(emit=)` hands over the step's events once the tokens are sampled, before the model runs them (a server
    streams them meanwhile); the list is the one `step` returns, and finished sequences get their final state after
    the forward."""
    model = scripted("abc")
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: (calls.append("forward"), forward(*a, **k))[1]
    engine = Engine(model, TOK)
    seq = engine.add("P", SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=()))
    calls.clear()
    seen = []
    while engine.has_work:
        returned = engine.step(emit=lambda events: (calls.append("emit"), seen.append(list(events))))
        assert returned == seen[-1]
    assert calls == ["emit", "forward"] * 3
    assert [piece for events in seen for _, piece in events] == ["a", "b", "c"]
    assert seq.finish_reason == "length" and seq.final_state is not None


# ---- sampling ---------------------------------------------------------------------------------------


def test_sample_truncations():
    from aviary.generation.sampling import sample

    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, 2.95])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0)) == 0
    draws = {sample(logits, SamplingParams(top_k=2), g) for _ in range(200)}
    assert draws == {0, 4}
    draws = {sample(logits, SamplingParams(top_p=0.3), g) for _ in range(200)}
    assert draws == {0}  # the top token alone holds more than 30 % of the mass
    draws = {sample(logits, SamplingParams(min_p=0.5), g) for _ in range(300)}
    assert draws == {0, 1, 4}
    # low temperature sharpens, high flattens (never adds tokens that truncation removed)
    cold = [sample(logits, SamplingParams(temperature=0.01), g) for _ in range(200)]
    assert cold.count(0) > 190  # p0 / p4 = e^(0.05 / 0.01) ~ 148


SAMPLER_SETTINGS = [dict(), dict(temperature=0.7), dict(temperature=1.6), dict(min_p=0.05),
                    dict(min_p=0.1, temperature=0.5), dict(top_p=0.9), dict(top_k=40, temperature=0.8),
                    dict(top_p=0.5, min_p=0.2, temperature=1.3), dict(temperature=0)]


@pytest.mark.parametrize("vocab", [50, 257, 1000, 65536])
@pytest.mark.parametrize("truncating", [True, False])
def test_sample_batch_equals_the_reference_pipeline(vocab, truncating):
    """The batched sampler (exp(x - max) with the temperature in the exponent, blocked inverse CDF) draws the same
    tokens as the reference pipeline step by step (softmax, truncation, min-p, ** 1/T, one float64 cumulative
    sum), from the same random streams: flat to peaked rows, banned tokens, a vocabulary that is not a multiple of
    the draw's block, batches with and without top-p/top-k (which take different paths).

    Without truncation the two round differently (exp((x - max) / T) against softmax ** (1 / T)), so a uniform
    number within rounding of a boundary between two tokens may pick either: a differing pick must sit on such a
    boundary of the exact (float64) distribution, and be rare."""
    from aviary.generation import sampling

    settings = [kw for kw in SAMPLER_SETTINGS if truncating or not ({"top_p", "top_k"} & kw.keys())]
    g = torch.Generator().manual_seed(vocab)
    differ = total = 0
    for scale in (0.5, 3.0, 10.0):
        logits = torch.randn(3 * len(settings), vocab, generator=g) * scale
        logits[0, ::3] = -float("inf")
        ps = [SamplingParams(**settings[i % len(settings)]) for i in range(len(logits))]
        for rep in range(12):
            seeds = [rep * 1000 + i for i in range(len(ps))]
            ours = sampling.sample_batch(logits, ps, [torch.Generator().manual_seed(s) for s in seeds])
            ref = sampling.sample_batch_reference(logits, ps, [torch.Generator().manual_seed(s) for s in seeds])
            total += len(ours)
            for i in (i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b):
                differ += 1
                p, row = ps[i], logits[i].double()
                assert not truncating, (scale, rep, i)  # the same probabilities, the same truncation
                probs = torch.softmax(row, dim=-1)
                probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs) ** (1 / p.temperature)
                cdf = probs.cumsum(0) / probs.sum()
                u = float(torch.rand((), generator=torch.Generator().manual_seed(seeds[i])))
                assert abs(float(cdf[min(ours[i], ref[i])]) - u) < 1e-5, (scale, rep, i)
    assert differ <= total // 200, differ


def test_blocked_draw_equals_one_cumulative_sum():
    """`draw` against `draw_reference`: zero weights are never drawn (a row with a single nonzero weight, the last
    of a block or of a padded tail), u at 0 and just below 1, and empty rows report a total of 0."""
    from aviary.generation import sampling

    g = torch.Generator().manual_seed(0)
    for vocab in (1, 7, 256, 300, 65536):
        w = torch.rand(6, vocab, generator=g)
        w[1] = 0.0
        w[1, -1] = 0.25  # only the last id
        w[2, : vocab // 2] = 0.0  # the first half truncated
        w[3] = 0.0  # nothing left
        w[4, torch.rand(vocab, generator=g) < 0.9] = 0.0
        w[4, vocab // 2] = 0.5  # sparse, never empty
        for u in (torch.zeros(6), torch.full((6,), 1 - 2**-24), torch.rand(6, generator=g)):
            ids, total = sampling.draw(w, u)
            ref_ids, ref_total = sampling.draw_reference(w, u)
            torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
            assert total[3] == 0
            live = [0, 1, 2, 4, 5] if vocab > 1 else [0, 1, 5]
            assert ids[live].tolist() == ref_ids[live].tolist(), (vocab, u)
            assert bool((w[live].gather(1, ids[live, None]) > 0).all())


def test_nonfinite_logits_warn_and_fall_back_to_argmax():
    from aviary.generation import sampling

    logits = torch.randn(3, 100)
    logits[1, 5] = float("nan")
    logits[2] = -float("inf")  # every token banned: not a fault, no warning of its own
    with pytest.warns(RuntimeWarning, match="NaN or"):
        picks = sampling.sample_batch(logits, [SamplingParams()] * 3, [torch.Generator().manual_seed(i)
                                                                       for i in range(3)])
    assert all(0 <= t < 100 for t in picks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampling.sample_batch(logits[[0, 2]], [SamplingParams()] * 2, [None, None])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(min_p=1.0), dict(max_new_tokens=-1), dict(penalty_decay=2.0),
                                 dict(stop=("",)), dict(temperature=float("nan")), dict(seed="x"),
                                 dict(banned_tokens=(-1,))])
def test_invalid_sampling_settings_raise(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


class ConstantModel(ScriptedModel):
    """The same logits at every step (so only the penalties change what greedy decoding picks)."""

    def __init__(self, logits):
        super().__init__([], vocab_size=logits.numel())
        self.logits = logits

    def forward(self, tokens, state=None, last_only=False, inplace=False):  # may ignore inplace: the engine
        # keeps the state it gets back
        B = tokens.shape[0]
        return self.logits.expand(B, 1, -1).clone(), state if state is not None else self.init_state(B)


@pytest.mark.oracle
def test_penalties_match_the_reference_pipeline(monkeypatch):
    """Greedy decoding under presence/frequency penalties with decay picks the same tokens as the rwkv
    package's PIPELINE.generate (including its rule that spaces and digits are not counted)."""
    pytest.importorskip("rwkv")
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(65536, generator=g) * 0.1
    favourites = {ord(c) + 1: 3.0 - 0.05 * i for i, c in enumerate("ab 7cd")}  # byte tokens incl. space, digit
    for t, v in favourites.items():
        logits[t] = v

    class RefModel:
        def forward(self, tokens, state):
            return logits.clone(), state

    ref_pipe = PIPELINE(RefModel(), "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS(temperature=0, alpha_presence=0.3, alpha_frequency=0.25, alpha_decay=0.9)
    expected = ref_pipe.generate("Q", token_count=40, args=args)

    vocab = os.path.join(os.path.dirname(sys.modules["rwkv.utils"].__file__), "rwkv_vocab_v20230424.txt")
    trie = TRIE_TOKENIZER(vocab)

    class TrieAdapter:
        encode = staticmethod(trie.encode)
        decode_bytes = staticmethod(trie.decodeBytes)

    ours = generate(ConstantModel(logits), TrieAdapter(), "Q", SamplingParams(
        temperature=0, max_new_tokens=40, presence_penalty=0.3, frequency_penalty=0.25, penalty_decay=0.9,
        stop_token_ids=()))
    assert ours == expected
    assert len(set(expected)) >= 4  # the penalties really moved greedy decoding around


def test_model_generate_and_stream_methods(model):
    text = model.generate("Hello", 12, tokenizer=TOK, temperature=0, stop_token_ids=())
    assert text == generate(model, TOK, "Hello", GREEDY)
    assert "".join(model.stream("Hello", 12, tokenizer=TOK, temperature=0, stop_token_ids=())) == text
    assert model.generate(["Hello", "é"], 12, tokenizer=TOK, temperature=0, stop_token_ids=()) == \
        generate(model, TOK, ["Hello", "é"], GREEDY)


def test_ids_the_tokenizer_cannot_decode_are_never_sampled():
    """A 300-row head with a 257-id tokenizer (like the World vocabulary's 65530 ids in a 65536-row head):
    the rows without text are masked, so a large logit there cannot fail the batch with a decode error."""
    m = ConstantModel(torch.cat([torch.zeros(257), torch.full((43,), 30.0)]))
    m.logits[ord("x") + 1] = 20.0  # the best decodable id by far
    text = generate(m, TOK, "P", SamplingParams(temperature=1.0, max_new_tokens=5, seed=0, stop_token_ids=()))
    assert text == "xxxxx"


@pytest.mark.parametrize("vocab", [50, 4000, 65536])
def test_truncation_by_candidates_equals_a_full_sort(vocab, monkeypatch):
    """top-p/top-k through the top candidates (then more, then a full sort) keep exactly what one full sort per row
    keeps: peaked rows settle among the first candidates, flat ones (top_p 0.999) go on to the full sort."""
    from aviary.generation import sampling

    monkeypatch.setattr(sampling, "TOP_CANDIDATES", (16, 256))  # small, so every path runs at these sizes
    g = torch.Generator().manual_seed(vocab)
    settings = [dict(top_p=0.3), dict(top_p=0.85), dict(top_p=0.999), dict(top_p=1.0), dict(top_k=5),
                dict(top_k=300), dict(top_p=0.9, top_k=20), dict(top_p=0.5, top_k=vocab + 1)]
    for scale in (0.3, 3.0, 10.0):  # flat to peaked
        probs = torch.softmax(torch.randn(len(settings), vocab, generator=g) * scale, dim=-1)
        ps = [SamplingParams(**kw) for kw in settings]
        torch.testing.assert_close(sampling._truncate_top(probs, ps), sampling.truncate_reference(probs, ps),
                                   rtol=0, atol=0)
