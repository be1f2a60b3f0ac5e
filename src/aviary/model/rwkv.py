"""The language-model shell shared by every RWKV generation.

    x = LN0(emb[tokens])                                   # ln0 lives in block 0 only
    for each block i:
        x = x + TimeMix_i(LN1(x), shift_i, wkv_i)           # v7 also threads v_first
        x = x + ChannelMix_i(LN2(x), shift_i)
    logits = head(LN_out(x))

Token shift ("sx", the previous token's LayerNorm-ed input) is formed here, once, for both mixers;
each version's file only sees (x, sx). The version's `VersionSpec` (`aviary.model.VERSIONS`) names its
mixers, its state and its CPU decode record. On a CPU, a one-token step runs all blocks in one C call where
it can (`aviary.cpu.blocks`, by the spec's `cpu_block`); where it cannot, these Blocks are the path (and
always the reference). `model.decode_path` says which runs. Parameter names are the official BlinkDL ones,
so official checkpoints load with `strict=True`.

What is built on a model lives in its own layer: generation in `aviary.generation` (`model.generate` and
`model.stream` are conveniences), sentence embeddings in `aviary.embeddings` (`model.embed`), int8 in
`aviary.quant`, the fp16 rescale in `aviary.model.rescale`, the decode thread policy and path in `aviary.cpu`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn as nn

from aviary.config import ModelConfig
from aviary.cpu import DecodePath, Linear, decode_path, products
from aviary.cpu.blocks import decode_blocks
from aviary.cpu.threads import small_ops_on_one_thread
from aviary.model import VERSIONS
from aviary.model.common import Embedding, LayerNorm, VersionSpec, token_shift
from aviary.ops import backends_of
from aviary.state import RWKVState, StateError, layer_major, time_state_to_wkv

__all__ = ["RWKV"]


class Block(nn.Module):
    """Pre-LayerNorm residual block: time-mix then channel-mix."""

    def __init__(self, config: ModelConfig, layer_id: int, spec: VersionSpec):
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = LayerNorm(C)
        self.ln1 = LayerNorm(C)
        self.ln2 = LayerNorm(C)
        self.att = spec.time_mix(config, layer_id)
        self.ffn = spec.channel_mix(config, layer_id)

    def forward(self, x, shift, wkv, v_first, backend: str, wkv_out=None):
        """x [B, T, C]; shift [B, 2, C]; wkv [B, *S] -> (x, shift, wkv, v_first).

        wkv_out: where the new wkv may be written (it may be `wkv` itself). A hint for the C decode
        step, which then needs no copy; every other path returns a new tensor and ignores it."""
        xa = self.ln1(x)
        dx, wkv, v_first = self.att(xa, token_shift(xa, shift[:, 0]), wkv, v_first, backend, wkv_out)
        x = x + dx
        xf = self.ln2(x)
        x = x + self.ffn(xf, token_shift(xf, shift[:, 1]))
        shift = torch.stack([xa[:, -1], xf[:, -1]], dim=1).float()  # [B, 2, C]
        return x, shift, wkv, v_first


class RWKV(nn.Module):
    """An RWKV-4/5/6/7 language model.

    `model(tokens, state)` runs a whole sequence with the parallel form of the chosen backend (one
    token runs the recurrent step) and returns `(logits [B, T, V], new_state)`. Calling it on the
    first part of a sequence and then on the rest with the returned state gives the same result as
    one call on the whole sequence.
    """

    def __init__(self, config: ModelConfig, backend: str = "chunked"):
        super().__init__()
        self.config = config
        self.spec = VERSIONS[config.version]
        C, V = config.n_embd, config.vocab_size
        self.emb = Embedding(V, C)
        self.blocks = nn.ModuleList(Block(config, i, self.spec) for i in range(config.n_layer))
        self.ln_out = LayerNorm(C)
        self.head = Linear(C, V, bias=False)
        self.backend = backend
        self.rescale_every = 0  # fp16 trick for v4-v6: halve x every N layers (aviary.model.rescale)
        self.initial_wkv: torch.Tensor | None = None  # [L, *S] from a state-tuned checkpoint
        # one-token steps run small ops on one thread and the big products on all (aviary.cpu.threads); true
        # while every big product steps the thread count back up (aviary.cpu.can_split_threads)
        self.split_decode_threads = True

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        """How sequences run: a backend of this version's time-mix op (`aviary.ops.backends_of`)."""
        names = backends_of(self.spec.time_mix.op)
        if name not in names:
            raise ValueError(f"RWKV-{self.config.version} has no {name!r} backend; choose one of {', '.join(names)}")
        self._backend = name

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.emb.weight.device

    # ---- state -------------------------------------------------------------------------------

    def init_state(self, batch_size: int = 1) -> RWKVState:
        """The state before any token: zeros, or the state-tuned `time_state` when the checkpoint has one. While
        state tuning (`aviary.peft`), each time-mix's trainable `time_state` [H, V, K] is the start, and the
        state returned is differentiable with respect to it."""
        cfg, device = self.config, self.device
        shift = torch.zeros(cfg.n_layer, batch_size, 2, cfg.n_embd, device=device).transpose(0, 1)
        start = self.initial_wkv
        if hasattr(self.blocks[0].att, "time_state"):  # the parameters of state tuning
            start = time_state_to_wkv(torch.stack([block.att.time_state for block in self.blocks]))  # [L, *S]
        if start is not None:
            wkv = layer_major(start.to(device)[None].expand(batch_size, *start.shape))
        else:
            one = self.spec.empty_wkv(cfg, batch_size, device)  # [B, *S]
            wkv = torch.stack([one] * cfg.n_layer, dim=0).transpose(0, 1)  # layer-major (aviary.state)
        return RWKVState(cfg.version, shift, wkv)

    def set_initial_state(self, wkv: torch.Tensor) -> None:
        """Use `wkv` [L, *S] (this library's orientation) as the state before any token."""
        expected = self.init_state(1).wkv.shape[1:]
        if tuple(wkv.shape) != tuple(expected):
            raise StateError(f"initial state has shape {tuple(wkv.shape)}, this model needs {tuple(expected)}")
        self.initial_wkv = wkv.detach().float()

    def check_state(self, state: RWKVState, batch_size: int) -> None:
        cfg = self.config
        if state.version != cfg.version:
            raise StateError(f"state is for RWKV-{state.version}, this model is RWKV-{cfg.version}")
        if state.shift.dtype != torch.float32 or state.wkv.dtype != torch.float32:
            raise StateError(f"state tensors are {state.shift.dtype} / {state.wkv.dtype}; a state is float32 "
                             "(RWKVState.load converts a file's floating tensors)")
        want_shift = (batch_size, cfg.n_layer, 2, cfg.n_embd)
        want_wkv = (batch_size, cfg.n_layer, *self.spec.wkv_shape(cfg))
        if tuple(state.shift.shape) != want_shift or tuple(state.wkv.shape) != want_wkv:
            raise StateError(
                f"state shapes shift {tuple(state.shift.shape)} / wkv {tuple(state.wkv.shape)} do not fit "
                f"this model (expected {want_shift} / {want_wkv}): is it from another model or batch size?")

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, state: RWKVState | None = None, *, last_only: bool = False,
                inplace: bool = False, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, RWKVState]:
        """tokens [B, T] (or [T]) int64 -> (logits [B, T, V] float32, or [B, 1, V] if last_only; state).

        rows (with last_only): the batch rows whose logits are wanted, logits [len(rows), 1, V]; the head,
        most of a small model's cost, is not run for the others (a batched prefill of prompts that end at
        different places).

        inplace=True writes the new state into `state`'s tensors and returns that same object: no
        allocation per step (a batch-16 RWKV-7 state is 37 MB, and the page faults of a fresh one are a
        large part of a step: docs/benchmarks.md, Inference item 4). Only for a state nothing else holds,
        and without autograd."""
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        V = self.config.vocab_size
        # not while a CUDA graph captures (aviary.generation.cuda_graph checks the ids on the host): reading the
        # minimum back to the host is a synchronisation, which a capture forbids
        capturing = tokens.is_cuda and torch.cuda.is_current_stream_capturing()
        if tokens.numel() and not capturing and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            bad = tokens[(tokens < 0) | (tokens >= V)][0].item()
            raise ValueError(f"token id {bad} is outside this model's vocabulary [0, {V})")
        B, T = tokens.shape
        if inplace and (state is None or (torch.is_grad_enabled() and (state.shift.requires_grad
                                                                      or state.wkv.requires_grad))):
            raise ValueError("inplace=True needs a state to update and no autograd (use torch.no_grad())")
        if state is None:
            state = self.init_state(B)
        else:
            self.check_state(state, B)
        backend = "recurrent" if T == 1 else self.backend

        split = self.split_decode_threads and T == 1 and tokens.device.type == "cpu"
        with small_ops_on_one_thread() if split else nullcontext():
            logits, shift_out, wkv_out = self._run(tokens, state, backend, last_only, inplace, rows)
        return logits, (state if inplace else RWKVState(self.config.version, shift_out, wkv_out))

    def trunk(self, tokens, state, backend, inplace=False, *, fused_decode=True):
        """The embedding and the blocks, without `ln_out` and the head: -> (x [B, T, C], shift, wkv). `forward`
        is this plus the head; `aviary.embeddings` reads the hidden states from it. fused_decode=False never takes
        the one-token C decode path (which belongs to a server's scheduler thread): T = 1 runs the blocks too."""
        x = self.emb(tokens.to(self.emb.weight.device))  # [B, T, C]
        training = torch.is_grad_enabled()
        if x.dtype == torch.bfloat16 and (tokens.shape[1] > 1 or not fused_decode) and not training and x.is_cpu \
                and not products.TORCH_BF16_FAST:
            # torch has no bf16 instructions on this CPU (AVX2): every bf16 op would convert on the fly, and
            # the conversions made a bf16 prefill slower than the float32 one (docs/benchmarks.md, "CPU
            # instruction sets: AVX2 and the portable path"). Activations run in float32 (the bf16 weights
            # are widened per product); the logits are float32 anyway
            x = x.float()
        x = self.blocks[0].ln0(x)
        if inplace:  # layer i's slice is read (inside block) before it is overwritten
            shift_out, wkv_out = state.shift, state.wkv
        elif training:  # plain tensors (FSDP warns about returning views)
            shift_out, wkv_out = torch.empty_like(state.shift), torch.empty_like(state.wkv)
        else:
            shift_out, wkv_out = _layer_major_like(state.shift), _layer_major_like(state.wkv)  # filled per layer
        v_first = None
        # a one-token step: all blocks in one C call where that runs (aviary.cpu.blocks); None: not here
        one_call = fused_decode and tokens.shape[1] == 1 and not training and not self.rescale_every
        done = decode_blocks(self.spec.cpu_block, self.blocks, x, state.shift, state.wkv, shift_out, wkv_out) \
            if one_call else None
        if done is not None:
            x = done
        else:
            for i, block in enumerate(self.blocks):
                # with the C decode step the new wkv is already in wkv_out[:, i]: the assignment is then a no-op
                x, shift_out[:, i], wkv_out[:, i], v_first = block(x, state.shift[:, i], state.wkv[:, i], v_first,
                                                                   backend, None if training else wkv_out[:, i])
                if self.rescale_every and (i + 1) % self.rescale_every == 0:
                    x = x / 2
        return x, shift_out, wkv_out

    def _run(self, tokens, state, backend, last_only, inplace, rows=None):
        x, shift_out, wkv_out = self.trunk(tokens, state, backend, inplace)
        if last_only:
            x = x[:, -1:]
            if rows is not None:
                x = x[list(rows)]
                if not len(x):
                    return x.new_zeros(0, 1, self.config.vocab_size, dtype=torch.float32), shift_out, wkv_out
        # float_out: in a decode step the C kernel's float32 sums come back unrounded; rounding bf16 logits
        # was most of a trained bf16 model's logit error (docs/benchmarks.md, "Precision on trained models")
        logits = self.head(self.ln_out(x), float_out=True).float()
        return logits, shift_out, wkv_out

    # ---- conveniences for the layers built on a model ---------------------------------------------

    def quantize(self, scheme: str = "int8", *, head: bool = True) -> RWKV:
        """`aviary.quant.quantize(self, scheme, head=head)`: int8 weight-only block linears and head, in place.
        Returns the model."""
        from aviary.quant import quantize

        return quantize(self, scheme, head=head)

    @property
    def decode_path(self) -> DecodePath:
        """What a one-token step runs on now (`aviary.cpu.decode_path`): device, CPU instruction set, C blocks
        or torch's, products in C, threads."""
        return decode_path(self)

    def generate(self, prompt, max_new_tokens: int = 256, *, tokenizer=None, state: RWKVState | None = None,
                 **sampling):
        """Text that follows `prompt`: str -> str, a list of prompts -> list[str] (decoded as one batch), by
        `aviary.generation.generate`. `sampling` takes the fields of `aviary.generation.SamplingParams`
        (temperature=0 is greedy); tokenizer: default, the standard one for the version."""
        from aviary.generation import generate

        return generate(self, self._tokenizer(tokenizer), prompt, state=state, max_new_tokens=max_new_tokens,
                        **sampling)

    def stream(self, prompt, max_new_tokens: int = 256, *, tokenizer=None, state: RWKVState | None = None,
               **sampling):
        """Like `generate`, as an iterator of text pieces ((prompt index, piece) pairs for a list)."""
        from aviary.generation import stream

        return stream(self, self._tokenizer(tokenizer), prompt, state=state, max_new_tokens=max_new_tokens,
                      **sampling)

    def embed(self, texts, *, method: str = "mean", tokenizer=None, **options):
        """One vector per text ([N, D] float32, L2-normalised) by `aviary.embeddings.embed`: method mean, last,
        state or emb-rwkv; `options` are embed's (batch_size, normalize, chunk_len, task, state_stats)."""
        from aviary.embeddings import embed

        return embed(self, self._tokenizer(tokenizer), texts, method=method, **options)

    def _tokenizer(self, tokenizer):
        from aviary.tokenizer import load_tokenizer

        return load_tokenizer(version=self.config.version) if tokenizer is None else tokenizer

    @property
    def num_parameters(self) -> int:
        from aviary.quant import Int8Linear

        n = sum(p.numel() for p in self.parameters())  # int8 weights are buffers, not parameters
        return n + sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, Int8Linear))


def _layer_major_like(t: torch.Tensor) -> torch.Tensor:
    """An empty [B, L, ...] tensor like t whose memory is laid out layer by layer ([L, B, ...] transposed).

    Each layer reads and writes its slice [:, i]; batch-major memory makes that slice strided when B > 1,
    and the WKV step then copies the whole slice in and out, a large part of a batch step (docs/benchmarks.md,
    Design measurements item 5). Layer-major memory makes every slice contiguous, and the next step gets a
    state laid out the same way. The shape and values are the same; only `is_contiguous()` differs (state
    files call .contiguous())."""
    return torch.empty((t.shape[1], t.shape[0], *t.shape[2:]), dtype=t.dtype, device=t.device).transpose(0, 1)

