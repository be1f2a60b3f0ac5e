"""`POST /v1/embeddings`, OpenAI-compatible: one vector per input (`aviary.embeddings`).

    {"model": ..., "input": "text" | ["text", ...] | [id, ...] | [[id, ...], ...],
     "encoding_format": "float" (default) | "base64", "dimensions": N, "user": ...,
     "method": "mean" | "last" | "state" | "emb-rwkv"}                          (method: an Aviary extension)
 -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "base64"}],
     "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}

Vectors are L2-normalised; `dimensions` keeps the first N coordinates and normalises again (Matryoshka-style:
only meaningful for a model trained for it, which no method here is). base64 is the little-endian float32
bytes, as OpenAI sends them (the `openai` client asks for base64 by default and decodes it).

The model runs in a worker thread (`asyncio.to_thread`), one embedding request at a time (a lock), beside
the scheduler's thread that decodes the chat and completion requests: the event loop is never blocked, and
the two threads share the CPU (and torch's thread settings) while both run. The embedding path never takes
the one-token C decode step (`aviary.embeddings.hidden_states`), and the C kernels' worker pool serves one
caller at a time and runs a second caller's job on that caller's own thread (aviary/csrc/threads.c).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from aviary.embeddings import METHODS, embed, to_base64, truncate
from aviary.serve.protocol import ApiError, validation_error

__all__ = ["DEFAULT_METHOD", "MAX_INPUTS", "EmbeddingRequest", "Embeddings"]

DEFAULT_METHOD = "mean"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    method: Literal[METHODS] | None = None  # extension  # type: ignore[valid-type]


class Embeddings:
    """The endpoint; `api` is the app's `_Api` (authorisation, body reading, the model's name and limits)."""

    def __init__(self, api, *, default_method: str | None = None, max_inputs: int = MAX_INPUTS):
        self.api = api
        self.model = api.scheduler.engine.model
        self.default_method = default_method or ("emb-rwkv" if getattr(self.model, "embedding_heads", None)
                                                 is not None else DEFAULT_METHOD)
        self.max_inputs = max_inputs
        self._lock = threading.Lock()  # one embedding computation at a time

    async def __call__(self, request: Request):
        api = self.api
        api.authorize(request)
        try:
            req = EmbeddingRequest.model_validate(await api.read_json(request))
        except ValidationError as e:
            raise validation_error(e) from None
        api.check_model(req.model)
        ids = api.token_lists(req.input, "input", self.max_inputs)
        method = req.method or self.default_method
        if method == "emb-rwkv" and getattr(self.model, "embedding_heads", None) is None:
            raise ApiError(400, "The method 'emb-rwkv' needs an EmbeddingRWKV checkpoint; this server's model "
                                "has no embedding heads.", param="method", code="invalid_value")
        vectors = await asyncio.to_thread(self._embed, ids, method)
        if req.dimensions is not None:
            if req.dimensions > vectors.shape[1]:
                raise ApiError(400, f"dimensions is {req.dimensions}; the '{method}' embeddings of this model "
                                    f"have {vectors.shape[1]}.", param="dimensions", code="invalid_value")
            vectors = truncate(vectors, req.dimensions)
        base64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i, "embedding": to_base64(v) if base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        n = sum(len(x) for x in ids)
        return JSONResponse({"object": "list", "data": data, "model": api.model_name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _embed(self, ids: list[list[int]], method: str):
        with self._lock:
            return embed(self.model, self.api.tokenizer, ids, method=method)
