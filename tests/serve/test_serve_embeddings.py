"""`POST /v1/embeddings` on a live `aviary serve`, through the real `openai` client (which asks for base64 and
decodes it) and raw httpx: the vectors are `aviary.embeddings.embed`'s, floats and base64 agree, `dimensions`
truncates and renormalises, `usage` counts the input tokens; every bad field gets OpenAI error JSON with a 400,
and chat completions keep working beside embeddings."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import numpy as np
import openai
import pytest
import torch

import aviary
from aviary.cli import build_parser
from aviary.embeddings import embed, truncate
from aviary.serve.embeddings import MAX_INPUTS
from live import LiveServer

pytest.importorskip("uvicorn")

KEY = "test-key"
MODEL = "tiny-v7"  # the stem of the `checkpoint` fixture's file (tests/conftest.py)
TEXTS = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell on Monday."]


@pytest.fixture(scope="module")
def served(checkpoint):
    from aviary.commands.serve import build

    threads = torch.get_num_threads()
    args = build_parser().parse_args(["serve", str(checkpoint), "--api-key", KEY, "--threads", "1",
                                      "--max-prompt-tokens", "300"])
    app, scheduler = build(args)
    live = LiveServer(app)
    yield live
    live.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(model, tokenizer) loaded as the server loads them, to compute the expected vectors."""
    model = aviary.load(checkpoint)
    return model, aviary.load_tokenizer(version=model.config.version)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(served, body: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(served.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def test_openai_client_gets_the_embed_vectors(client, reference):
    model, tokenizer = reference
    out = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    got = torch.tensor([d.embedding for d in out.data])
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == MODEL and out.object == "list"
    torch.testing.assert_close(got, embed(model, tokenizer, TEXTS, method="mean"), atol=1e-6, rtol=0)
    n = sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert out.usage.prompt_tokens == n and out.usage.total_tokens == n

    one = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), got[0], atol=1e-6, rtol=0)


def test_float_and_base64_agree_and_dimensions_renormalise(served, reference):
    floats = post(served, {"model": MODEL, "input": TEXTS, "encoding_format": "float"}).json()
    b64 = post(served, {"model": MODEL, "input": TEXTS, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=0)
    cut = post(served, {"model": MODEL, "input": TEXTS, "dimensions": 16, "encoding_format": "float"}).json()
    vectors = torch.tensor([d["embedding"] for d in cut["data"]])
    assert vectors.shape == (3, 16)
    torch.testing.assert_close(vectors, truncate(torch.tensor([d["embedding"] for d in floats["data"]]), 16))


def test_token_ids_and_methods(served, reference):
    model, tokenizer = reference
    ids = [tokenizer.encode(t) for t in TEXTS[:2]]
    by_ids = post(served, {"model": MODEL, "input": ids, "encoding_format": "float"}).json()
    by_one = post(served, {"model": MODEL, "input": ids[0], "encoding_format": "float"}).json()
    want = embed(model, tokenizer, ids)
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in by_ids["data"]]), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(by_one["data"][0]["embedding"]), want[0], atol=1e-6, rtol=0)
    for method in ("last", "state"):
        out = post(served, {"model": MODEL, "input": TEXTS[:2], "method": method, "encoding_format": "float"}).json()
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in out["data"]]),
                                   embed(model, tokenizer, TEXTS[:2], method=method), atol=1e-5, rtol=0)


def test_embeddings_beside_chat_completions(client):
    """Embedding requests run on a worker thread while the scheduler decodes: both finish, neither fails."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        chats = [pool.submit(client.chat.completions.create, model=MODEL, max_tokens=20, temperature=0,
                             messages=[{"role": "user", "content": f"Hi {i}"}]) for i in range(4)]
        embeds = [pool.submit(client.embeddings.create, model=MODEL, input=TEXTS * 4) for _ in range(4)]
        assert all(len(f.result().data) == 12 for f in embeds)
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in chats)


@pytest.mark.parametrize("body, param, code", [
    ({"input": ""}, "input", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": ["ok", ""]}, "input", "invalid_value"),
    ({"input": [[]]}, "input", "invalid_value"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", "invalid_value"),
    ({"input": " ".join(map(str, range(400)))}, "input", "context_length_exceeded"),
    ({"input": [1, 70000]}, "input", "invalid_value"),
    ({"input": [1, True]}, "input", "invalid_value"),
    ({"input": 5}, "input", "invalid_value"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"input": "a", "dimensions": 65}, "dimensions", "invalid_value"),
    ({"input": "a", "dimensions": "8"}, "dimensions", "invalid_value"),
    ({"input": "a", "method": "max"}, "method", "invalid_value"),
    ({"input": "a", "method": "emb-rwkv"}, "method", "invalid_value"),
    ({"input": "a", "temperature": 1}, "temperature", "unknown_parameter"),
    ({}, "input", "missing_required_parameter"),
])
def test_bad_requests_get_openai_errors(served, body, param, code):
    r = post(served, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].split(".")[0] == param and error["code"] == code, error
    assert error["type"] == "invalid_request_error"


def test_model_and_key_are_checked(served):
    r = post(served, {"model": "gpt-4", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(served, {"model": MODEL, "input": "a"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0).embeddings.create(model=MODEL, input="")
