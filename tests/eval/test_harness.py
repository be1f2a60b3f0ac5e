"""aviary.eval.harness_lm / aviary.eval.harness: the lm-evaluation-harness adapter answers each request as a
plain forward would, sharing a context's state changes nothing, and the local LAMBADA task runs offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from aviary.eval.harness import task_manager  # noqa: E402
from aviary.eval.harness_lm import AviaryLM  # noqa: E402
from aviary.model import RWKV  # noqa: E402
from aviary.testing import ByteTokenizer, random_config, random_state_dict  # noqa: E402
from eval_helpers import tiny_model  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def model():
    return tiny_model(7, seed=3)


@pytest.fixture(scope="module")
def lm(model):
    return AviaryLM(model, tokenizer=ByteTokenizer(), chunk_len=7, batch_size=2)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def plain_log_probs(model, ids: list[int]) -> torch.Tensor:
    """[T-1, V] log-softmax after each of ids[:-1], from one forward."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, :-1].float(), -1).double()


def plain_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = context + continuation
    lp = plain_log_probs(model, ids)[len(context) - 1:]  # the rows that predict the continuation
    target = torch.tensor(continuation)
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


PAIRS = [("The cat sat on the", " mat"), ("The cat sat on the", " hat and"), ("The cat sat on the", " dog"),
         ("A lone context ", "ends in spaces"), ("", "no context at all"), ("x", "y")]


def test_loglikelihood_equals_log_softmax_of_one_forward(lm, model):
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in PAIRS], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        if context:  # lm-eval moves the context's trailing spaces onto the continuation
            n = len(context) - len(context.rstrip())
            context, continuation = context.rstrip(), context[len(context) - n:] + continuation
        ctx = lm.tok_encode(context) or [0]  # an empty context is the end-of-text token
        want_lp, want_greedy = plain_score(model, ctx, lm.tok_encode(continuation))
        assert logprob == pytest.approx(want_lp, abs=1e-5)
        assert greedy == want_greedy


def test_greedy_flag_is_every_token_argmax(lm, model):
    ctx = lm.tok_encode("Once upon a time")
    chain = []  # the greedy continuation, token by token
    for _ in range(4):
        chain.append(int(plain_log_probs(model, ctx + chain + [0])[-1].argmax()))
    wrong_last = chain[:3] + [(chain[3] + 1) % 257 or 1]
    got = lm._loglikelihood_tokens([(None, ctx, chain), (None, ctx, chain[:1]), (None, ctx, wrong_last)],
                                   disable_tqdm=True)
    assert [g for _, g in got] == [True, True, False]
    assert got[0][0] == pytest.approx(plain_score(model, ctx, chain)[0], abs=1e-5)


def test_shared_context_state_equals_each_pair_alone(lm):
    requests = [("The cat sat on the", x) for x in (" mat", " hat and a bat", " dog", " ")] + [("x", "yz")]
    requests = [(None, lm.tok_encode(c), lm.tok_encode(x)) for c, x in requests]
    shared = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    for (a, ga), (b, gb) in zip(shared, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_loglikelihood_rolling_is_the_whole_document_through_the_state(lm, model):
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune", "a"]
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts], disable_tqdm=True)
    for text, value in zip(texts, got, strict=True):
        ids = [0, *lm.tok_encode(text)]  # scored after the end-of-text token; chunk_len=7 splits the text
        want = plain_log_probs(model, ids).gather(-1, torch.tensor(ids[1:])[:, None]).sum()
        assert value == pytest.approx(float(want), abs=1e-4)


def test_generate_until_stops_before_the_stop_string(lm):
    prompt = "Call me Ishmael."
    free = lm.generate_until([request("generate_until", prompt, {"until": [], "max_gen_toks": 24})],
                             disable_tqdm=True)[0]
    assert 0 < len(free) <= 24  # a byte token decodes to at most one character
    stop = free[len(free) // 2]
    kwargs = {"until": [stop], "max_gen_toks": 24}
    # three requests with batch_size 2: a batch of two and one alone give the same text as one alone
    got = lm.generate_until([request("generate_until", p, kwargs) for p in (prompt, "Other text", prompt)],
                            disable_tqdm=True)
    assert got[0] == got[2] == free[:free.index(stop)]
    assert stop not in got[1]


def test_simple_evaluate_local_lambada_offline(tmp_path, monkeypatch):
    import lm_eval

    if not (DATA_DIR / "eval" / "lambada_openai.jsonl.xz").is_file():
        pytest.skip(f"no LAMBADA data at {DATA_DIR}")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = task_manager(DATA_DIR, include_defaults=False, cache_dir=tmp_path / "datasets")
    assert {"aviary_lambada_openai", "aviary_lambada_austen", "aviary_corpus_ppl"} <= set(manager.all_tasks)
    config = random_config(7, n_layer=1, n_embd=32, head_size=32, vocab_size=300)  # small: 50 passages of bytes
    net = RWKV(config)
    net.load_state_dict(random_state_dict(config, seed=4), strict=True)
    lm = AviaryLM(net.eval(), tokenizer=ByteTokenizer())
    out = lm_eval.simple_evaluate(model=lm, tasks=["aviary_lambada_openai"], limit=50, task_manager=manager,
                                  bootstrap_iters=0, log_samples=False)
    result = out["results"]["aviary_lambada_openai"]
    assert out["n-samples"]["aviary_lambada_openai"]["effective"] == 50
    assert 0.0 <= result["acc,none"] <= 1.0
    assert result["perplexity,none"] > 1.0


def test_registered_as_aviary_and_built_from_model_args(tmp_path):
    from lm_eval.api.registry import get_model

    from aviary.testing import save_random_checkpoint

    path = tmp_path / "tiny.safetensors"
    save_random_checkpoint(path, random_config(7, n_layer=1, n_embd=64, head_size=32, vocab_size=300), seed=1)
    assert get_model("aviary") is AviaryLM
    lm = AviaryLM.create_from_arg_string(f"pretrained={path},dtype=bfloat16,batch_size=auto",
                                         {"device": "cpu", "batch_size": None})
    assert lm.batch_size == 16 and lm.model.emb.weight.dtype == torch.bfloat16
    assert lm.tok_encode("hi") == lm.tokenizer.encode("hi")  # the World tokenizer, by default
