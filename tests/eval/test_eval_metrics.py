"""aviary.eval's perplexity, LAMBADA and loss by position: each equals the same quantity computed from one
plain forward of the model, and the options that should not change a number do not."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aviary.eval.last_word import encode_passage, lambada, read_passages, split_passage
from aviary.eval.positions import bin_edges, bin_losses, loss_by_position
from aviary.eval.ppl import document_nll, perplexity
from aviary.testing import ByteTokenizer
from eval_helpers import tiny_model

DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "Short one.", "Ünïcödé bytes count too: 世界"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(7, seed=3)


def plain_nll(model, ids: list[int]) -> torch.Tensor:
    """-log p(ids[i+1] | ids[:i+1]) from one forward, float64."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), torch.tensor(ids[1:]), reduction="none")


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def test_ppl_through_the_state_is_the_mean_loss_of_one_forward(model, docs_file):
    tok = ByteTokenizer()
    (r,) = perplexity(model, tok, [docs_file], chunk_len=16)
    losses = torch.cat([plain_nll(model, [0, *tok.encode(d)]) for d in DOCS])
    assert r.documents == 3 and r.tokens == losses.numel() == sum(len(d.encode()) for d in DOCS)
    assert r.loss == pytest.approx(float(losses.mean()), abs=1e-6)
    assert r.perplexity == pytest.approx(math.exp(float(losses.mean())), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(float(losses.sum()) / math.log(2) / r.bytes, rel=1e-6)


def test_ppl_windows(model, docs_file):
    tok = ByteTokenizer()
    whole = perplexity(model, tok, [docs_file])[0]
    assert perplexity(model, tok, [docs_file], window=1000)[0].nll == pytest.approx(whole.nll, abs=1e-5)
    # window N: each N predicted tokens from a fresh state, the token before them as the only context
    ids = [0, *tok.encode(DOCS[0])]
    want = sum(float(plain_nll(model, ids[s - 1:s + 20]).sum()) for s in range(1, len(ids), 20))
    assert document_nll(model, ids, window=20) == pytest.approx(want, abs=1e-5)
    assert document_nll(model, ids, window=20) != pytest.approx(document_nll(model, ids), abs=1e-3)


def test_ppl_of_several_files_adds_a_total(model, docs_file, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text(DOCS[1])
    a, b, total = perplexity(model, ByteTokenizer(), [docs_file, text])
    assert total.name == "total" and total.tokens == a.tokens + b.tokens and total.nll == a.nll + b.nll


LAMBADA = [{"text": "She opened the door and saw her old friend Tom"},
           {"text": "A B C D"},
           {"context": "He drank a cup of", "target": "tea"}]


@pytest.fixture(scope="module")
def lambada_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lambada") / "lambada.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LAMBADA))
    return path


def test_lambada_passages_split_at_the_last_space(lambada_file):
    assert split_passage("a b  c") == ("a b ", " c")
    assert read_passages(lambada_file) == [("She opened the door and saw her old friend", " Tom"),
                                           ("A B C", " D"), ("He drank a cup of", " tea")]
    assert len(read_passages(lambada_file, limit=2)) == 2


@pytest.mark.parametrize("protocol", ["harness", "rwkv-lm"])
def test_lambada_equals_one_forward(model, lambada_file, protocol):
    tok = ByteTokenizer()
    r = lambada(model, tok, lambada_file, protocol=protocol)
    nll, correct = 0.0, 0
    for context, target in read_passages(lambada_file):
        ctx, cont = encode_passage(tok, context, target, protocol)
        assert ctx[0] == (0 if protocol == "rwkv-lm" else tok.encode(context)[0])
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + cont]))
        lp = torch.log_softmax(logits[0, len(ctx) - 1:-1].double(), -1)
        nll -= float(lp.gather(-1, torch.tensor(cont)[:, None]).sum())
        correct += bool((lp.argmax(-1) == torch.tensor(cont)).all())
    assert r.passages == 3 and r.correct == correct
    assert r.perplexity == pytest.approx(math.exp(nll / 3), rel=1e-5)


def test_lambada_rejects_bad_records(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "oneword"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        lambada(model, ByteTokenizer(), bad)
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="not a passage"):
        lambada(model, ByteTokenizer(), bad)


def test_bin_edges_are_logarithmic():
    assert bin_edges(17, per_octave=1) == [0, 1, 2, 4, 8, 16, 32]
    assert bin_edges(9, per_octave=2) == [0, 1, 2, 4, 5, 8, 11]


def test_loss_by_position_equals_a_plain_forward_binned(model, docs_file):
    tok = ByteTokenizer()
    bins = loss_by_position(model, tok, [docs_file], per_octave=2, chunk_len=16)
    per_doc = [plain_nll(model, [0, *tok.encode(d)]) for d in DOCS]
    edges = bin_edges(max(map(len, per_doc)), per_octave=2)
    assert [b.start for b in bins] == edges[:len(bins)]
    for b in bins:
        pooled = torch.cat([d[b.start:b.end] for d in per_doc])
        assert b.count == pooled.numel()
        assert b.loss == pytest.approx(float(pooled.mean()), abs=1e-6)
    assert sum(b.count for b in bins) == sum(map(len, per_doc))
    assert bin_losses([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], per_octave=1)[0].loss == 2.0


def test_harness_protocol_moves_trailing_spaces_to_the_target():
    tok = ByteTokenizer()
    assert encode_passage(tok, "a b ", " c", "harness") == (tok.encode("a b"), tok.encode("  c"))
    assert encode_passage(tok, "a b ", " c", "rwkv-lm") == ([0, *tok.encode("a b ")], tok.encode(" c"))
