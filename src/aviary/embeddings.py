"""Sentence embeddings from an RWKV model: one vector per text.

    embed(model, tokenizer, texts, method=...)  -> [N, D] float32, rows L2-normalised by default
    embed_methods(model, tokenizer, texts, [methods])  -> {method: [N, D]}, one pass over the texts for all

Methods (h_t is the output of `ln_out` at position t, i.e. the input of the LM head, a C-vector; T tokens):

    last      h_{T-1}: the final hidden state ("free sentence embedding (using the final hidden state)",
              RWKV-LM's README)
    mean      (1/T) sum_t h_t
    state     the recurrent wkv state after the last token, every layer's flattened and concatenated, each
              channel standardised: z_c = (s_c - mu_c) / (sigma_c + eps_l), with mu, sigma collected once per
              model from a fixed calibration set (`CALIBRATION_TEXTS`, or your own: `StateStats.collect`) and
              eps_l = 1e-2 x the mean sigma of the channel's layer (a channel that hardly moved on the
              calibration texts is not blown up). This is BlinkDL's recipe ("collect the mean+stdev
              statistics of each channel ... normalize all of them (data-independent)"), without the linear
              probe he trains on top. RWKV-4 uses aa/bb per layer (its pp is dropped, as he suggests); v5-v7
              the [H, K, V] matrices. D = n_layer x H x K x V: large (49,152 for the bundled model).
    emb-rwkv  an EmbeddingRWKV checkpoint (`load_embedding_rwkv`, the `rwkv-emb` package's layout): the
              end-of-sequence token 65535 is appended to each text, h is averaged over the EOS positions
              (`MultiEOSPooling`), then one of its task heads (`[RETR]` by default) is applied:
              y = LayerNorm(x + fc2(relu(fc1 x))).

Batching. Texts are sorted by length and run in batches with no padding: a batch runs in segments that end
where its shortest remaining text ends (or after `chunk_len` tokens), that text leaves the batch with its
own last hidden state and its own state, and the rest go on from theirs. A batch therefore gives the same
vectors as one text at a time (up to float32 rounding: segment boundaries differ), and a long text runs
in chunks through the state, so memory is that of one chunk whatever its length.

The hidden states are computed by `hidden_states`, which runs the model's blocks as `RWKV.forward` does
but stops at `ln_out` (the LM head over 65k tokens would cost more than the blocks of a small model at
every position); tests/embed/test_embeddings.py checks it against `RWKV.forward`'s logits.
"""

from __future__ import annotations

import base64
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.state import RWKVState

__all__ = ["CALIBRATION_TEXTS", "METHODS", "EmbeddingHeads", "StateStats", "embed", "embed_methods", "hidden_states",
           "load_embedding_rwkv", "to_base64", "truncate"]

METHODS = ("last", "mean", "state", "emb-rwkv")
EOS = 65535  # EmbeddingRWKV's end-of-sequence token
TASKS = ("[CLS]", "[STS]", "[RETR]")

# A fixed, varied set of texts for the `state` method's per-channel statistics: the normalisation must not
# depend on the texts being embedded (a batch would then change each text's vector). Written for this
# module; English prose, dialogue, code, numbers and a few other languages.
CALIBRATION_TEXTS = (
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "She opened the window and the cold morning air filled the small kitchen.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The river flooded the lower fields after three days of heavy rain.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; i++) { total += values[i]; }",
    "The invoice of 1,250.00 EUR is due on 2024-03-31.",
    "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "In the beginning was the word, and the word was with the story-teller.",
    "Stock markets fell sharply on Monday as investors worried about interest rates.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "Le chat dort sur le canapé depuis ce matin.",
    "El museo abre a las diez y cierra a las seis de la tarde.",
    "Мы гуляли по парку до самого вечера.",
    "今天的天气很好，我们去公园散步吧。",
    "日本の首都は東京です。",
    "Every person has the right to education, work and rest.",
    "The patient reported mild headaches and trouble sleeping for two weeks.",
    "Click the button in the top right corner to save your changes.",
    "A triangle's angles always add up to one hundred and eighty degrees.",
    "He scored twice in the second half and the crowd went wild.",
    "The old lighthouse keeper wrote letters he never sent.",
    "Please find attached the minutes of yesterday's meeting.",
    "Water boils at 100 degrees Celsius at sea level.",
    "I can't believe it's already December; the year went by so fast!",
    "The algorithm sorts the list in O(n log n) time and uses constant extra memory.",
    "Once upon a time, a fox and a crow lived at the edge of a great forest.",
    "Turn left at the second traffic light, then continue straight for 300 metres.",
    "The court ruled that the contract was void because it had not been signed.",
    "Volcanoes form where magma rises through cracks in the Earth's crust.",
)


# ---- the hidden states ------------------------------------------------------------------------------

def hidden_states(model, tokens: torch.Tensor, state: RWKVState | None = None) -> tuple[torch.Tensor, RWKVState]:
    """tokens [B, T] -> (ln_out output [B, T, C] float32, state after the tokens).

    The blocks run as in `RWKV.forward` (`RWKV.trunk`: the model's parallel backend, the fp16 rescale), without
    the LM head. Never the one-token C decode path: T = 1 runs the blocks too, so this can run on a thread other
    than a server's scheduler thread. No autograd."""
    state = model.init_state(tokens.shape[0]) if state is None else state
    with torch.no_grad():
        x, shift, wkv = model.trunk(tokens.to(model.device), state, model.backend, fused_decode=False)
        h = model.ln_out(x).float()  # [B, T, C]
    return h, RWKVState(model.config.version, shift, wkv)


def _state_vector(model, state: RWKVState) -> torch.Tensor:
    """[B, L, *S] wkv -> [B, D] raw state features (see the module docstring)."""
    return model.spec.state_features(state.wkv.float()).flatten(1)  # RWKV-4: aa/bb (model/v4.py)


# ---- the state method's statistics ------------------------------------------------------------------

@dataclass(frozen=True)
class StateStats:
    """Per-channel mean and scale of the raw state features, for the `state` method."""

    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]: sigma_c + eps of its layer

    @staticmethod
    def collect(model, tokenizer, texts: Sequence[str] = CALIBRATION_TEXTS, *, batch_size: int = 16,
                chunk_len: int = 1024) -> StateStats:
        """The statistics of `texts` (at least 2)."""
        if len(texts) < 2:
            raise ValueError("StateStats.collect needs at least 2 texts")
        ids = [_ids(tokenizer, t) for t in texts]
        raw = _encode(model, ids, ["raw-state"], batch_size, chunk_len, None)["raw-state"]
        mean, std = raw.mean(0), raw.std(0)
        layers = std.view(model.config.n_layer, -1)  # [L, D/L]
        eps = 1e-2 * layers.mean(1, keepdim=True) + 1e-12  # per layer
        return StateStats(mean, (layers + eps).flatten())

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean.to(raw.device)) / self.scale.to(raw.device)


_DEFAULT_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {tokenizer id: StateStats}


def _default_stats(model, tokenizer) -> StateStats:
    per_model = _DEFAULT_STATS.setdefault(model, {})
    key = id(tokenizer)
    if key not in per_model:
        per_model[key] = StateStats.collect(model, tokenizer)
    return per_model[key]


# ---- EmbeddingRWKV ----------------------------------------------------------------------------------

class _TaskHead(nn.Module):
    """rwkv-emb's NonlinearHead: y = LayerNorm(x + fc2(relu(fc1 x))), no biases in fc1/fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.relu(self.fc1(x))))


class EmbeddingHeads(nn.Module):
    """rwkv-emb's MultiTaskHead: one head per task, names as in its checkpoints (`head.retr_head.fc1.weight`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.cls_head, self.sts_head, self.retr_head = (_TaskHead(dim, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor, task: str = "[RETR]") -> torch.Tensor:
        if task not in TASKS:
            raise ValueError(f"unknown EmbeddingRWKV task {task!r}; choose one of {TASKS}")
        head = {"[CLS]": self.cls_head, "[STS]": self.sts_head, "[RETR]": self.retr_head}[task]
        return head(x)


def load_embedding_rwkv(path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
    """An EmbeddingRWKV checkpoint (keys `rwkv.*` for an RWKV-7 without a needed LM head, `head.*` for the
    task heads) -> an `RWKV` whose `embedding_heads` attribute holds the heads (`embed(method="emb-rwkv")`).

    A checkpoint without `rwkv.head.weight` gets a zero LM head that takes no memory (an expanded zero row):
    the embedding path never reads it; its logits are meaningless."""
    from aviary.io.checkpoint import _read_file, weight_files  # the checked reader, without the LM name layouts
    from aviary.loading import CheckpointError, ConfigError, model_from_state_dict

    sd = {}
    for f in weight_files(path):
        sd.update(_read_file(f))
    trunk = {k.removeprefix("rwkv."): v for k, v in sd.items() if k.startswith("rwkv.")}
    heads = {k.removeprefix("head."): v for k, v in sd.items() if k.startswith("head.")}
    if "emb.weight" not in trunk or "retr_head.fc1.weight" not in heads:
        raise CheckpointError(path, "not an EmbeddingRWKV checkpoint (rwkv-emb): it needs rwkv.emb.weight and "
                                    "head.retr_head.* tensors")
    emb = trunk["emb.weight"]
    if "blocks.0.att.v0" not in trunk and "blocks.1.att.v1" in trunk:  # never used by layer 0; official files
        C, rank = emb.shape[1], trunk["blocks.1.att.v1"].shape[1]       # have them, rwkv-emb's may not
        for name, shape in (("v0", (1, 1, C)), ("v1", (C, rank)), ("v2", (rank, C))):
            trunk[f"blocks.0.att.{name}"] = emb.new_zeros(shape)
    trunk.setdefault("head.weight", emb.new_zeros(1, emb.shape[1]).expand(emb.shape[0], emb.shape[1]))
    try:
        model = model_from_state_dict(trunk)
    except ConfigError as e:
        raise CheckpointError(path, str(e)) from None
    hidden, dim = heads["retr_head.fc1.weight"].shape
    model.embedding_heads = EmbeddingHeads(dim, hidden)
    model.embedding_heads.load_state_dict(heads, strict=True)
    from aviary.loading import _dtype

    return model.to(device=device, dtype=_dtype(dtype)).eval()


# ---- embed ------------------------------------------------------------------------------------------

def _ids(tokenizer, text: str | Sequence[int]) -> list[int]:
    return tokenizer.encode(text) if isinstance(text, str) else [int(t) for t in text]


def _encode(model, ids: list[list[int]], poolings: Sequence[str], batch_size: int, chunk_len: int,
            progress: Callable[[int], object] | None) -> dict[str, torch.Tensor]:
    """{pooling: the unnormalised vectors [N, D]} of token sequences (each non-empty), in the input order, all
    from one pass. Poolings: last | mean | eos (mean of h at EOS positions) | raw-state (the state features)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: a batch ends from its tail
    out: dict[str, list] = {p: [None] * len(ids) for p in poolings}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]  # lengths non-increasing
        seqs = [torch.tensor(ids[r], dtype=torch.long) for r in rows]
        lengths = [len(s) for s in seqs]
        state, pos = model.init_state(len(rows)), 0
        sums = {p: torch.zeros(len(rows), model.config.n_embd) for p in ("mean", "eos") if p in poolings}
        while rows:
            end = min(pos + chunk_len, lengths[-1])  # the shortest remaining text ends here at the latest
            tokens = torch.stack([s[pos:end] for s in seqs])  # [b, t]
            h, state = hidden_states(model, tokens, state)  # [b, t, C]
            if "mean" in sums:
                sums["mean"] += h.sum(1).cpu()
            if "eos" in sums:
                sums["eos"] += (h * (tokens == EOS).to(h)[..., None]).sum(1).cpu()
            pos = end
            keep = sum(1 for n in lengths if n > end)  # the texts that go on; the others end here
            for k in range(keep, len(rows)):
                for p, vectors in out.items():
                    if p == "last":
                        vectors[rows[k]] = h[k, -1].cpu()
                    elif p == "mean":
                        vectors[rows[k]] = sums[p][k] / lengths[k]
                    elif p == "eos":
                        vectors[rows[k]] = sums[p][k] / int((seqs[k] == EOS).sum())
                    else:
                        vectors[rows[k]] = _state_vector(model, state.select([k]))[0].cpu()
            if keep < len(rows):
                rows, seqs, lengths = rows[:keep], seqs[:keep], lengths[:keep]
                sums = {p: v[:keep] for p, v in sums.items()}
                state = RWKVState(state.version, state.shift[:keep], state.wkv[:keep])
            if progress is not None:
                progress(tokens.numel())
    return {p: torch.stack(vectors) for p, vectors in out.items()}


def truncate(vectors: torch.Tensor, dimensions: int) -> torch.Tensor:
    """The first `dimensions` coordinates, L2-normalised again (Matryoshka-style; meaningful only for a model
    trained so that its leading coordinates carry the meaning, which no method here guarantees)."""
    if not 1 <= dimensions <= vectors.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and {vectors.shape[-1]}, got {dimensions}")
    return F.normalize(vectors[..., :dimensions], dim=-1)


def embed(model, tokenizer, texts: str | Sequence[str] | Sequence[Sequence[int]], *, method: str = "mean",
          batch_size: int = 16, normalize: bool = True, chunk_len: int = 1024, task: str = "[RETR]",
          state_stats: StateStats | None = None, progress: Callable[[int], object] | None = None) -> torch.Tensor:
    """texts (a string, a list of strings, or token-id lists) -> embeddings [N, D] float32 on the CPU.

    method: see the module docstring. normalize: L2-normalise each row (cosine similarity is then a dot product).
    batch_size: texts run together; chunk_len: tokens per forward of a long text. task: the EmbeddingRWKV head
    (emb-rwkv). state_stats: the `state` method's statistics (default: collected once per model from
    CALIBRATION_TEXTS). progress(n) is called with the tokens of each forward."""
    return embed_methods(model, tokenizer, texts, [method], batch_size=batch_size, normalize=normalize,
                         chunk_len=chunk_len, task=task, state_stats=state_stats, progress=progress)[method]


def embed_methods(model, tokenizer, texts: str | Sequence[str] | Sequence[Sequence[int]], methods: Sequence[str],
                  **options) -> dict[str, torch.Tensor]:
    """{method: embed(model, tokenizer, texts, method=method, **options)} for several methods, from one pass
    over the texts (emb-rwkv, whose texts end with EOS, takes a pass of its own)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown embedding method {unknown[0] if unknown else None!r}; choose one of "
                         f"{', '.join(METHODS)}")
    if "emb-rwkv" in methods and len(set(methods)) > 1:
        rest = [m for m in methods if m != "emb-rwkv"]
        return {**embed_methods(model, tokenizer, texts, rest, **options),
                **embed_methods(model, tokenizer, texts, ["emb-rwkv"], **options)}
    return _embed(model, tokenizer, texts, list(dict.fromkeys(methods)), **options)


def _embed(model, tokenizer, texts, methods: list[str], *, batch_size: int = 16, normalize: bool = True,
           chunk_len: int = 1024, task: str = "[RETR]", state_stats: StateStats | None = None,
           progress: Callable[[int], object] | None = None) -> dict[str, torch.Tensor]:
    if batch_size < 1 or chunk_len < 1:
        raise ValueError("batch_size and chunk_len must be >= 1")
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts to embed")
    ids = [_ids(tokenizer, t) for t in texts]
    if methods == ["emb-rwkv"]:
        if getattr(model, "embedding_heads", None) is None:
            raise ValueError("method emb-rwkv needs an EmbeddingRWKV checkpoint (aviary.embeddings."
                             "load_embedding_rwkv); this model has no embedding heads")
        ids = [seq + [EOS] for seq in ids]
    empty = next((i for i, seq in enumerate(ids) if not seq), None)
    if empty is not None:
        raise ValueError(f"text {empty} is empty (no tokens)")
    V = model.config.vocab_size
    bad = next((t for seq in ids for t in seq if not 0 <= t < V), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside this model's vocabulary [0, {V})")
    stats = (state_stats or _default_stats(model, tokenizer)) if "state" in methods else None
    poolings = {"last": "last", "mean": "mean", "state": "raw-state", "emb-rwkv": "eos"}
    pooled = _encode(model, ids, [poolings[m] for m in methods], batch_size, chunk_len, progress)
    out = {}
    for m in methods:
        vectors = pooled[poolings[m]]
        if m == "state":
            vectors = stats.apply(vectors)
        elif m == "emb-rwkv":
            heads = model.embedding_heads
            with torch.no_grad():
                x = vectors.to(device=model.device, dtype=heads.retr_head.fc1.weight.dtype)
                vectors = heads(x, task).float().cpu()
        out[m] = F.normalize(vectors, dim=-1) if normalize else vectors
    return out


def to_base64(vector: torch.Tensor) -> str:
    """OpenAI's `encoding_format: base64`: the little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(vector.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode()
