"""The non-RWKV models the papers compare against, small enough for a CPU: a softmax-attention Transformer and
Mamba (the `transformers` implementation, whose slow path runs on a CPU).

Both expose the interface the experiments use: `hidden(tokens [B, T]) -> [B, T, C]` (after the final norm)
and `head` (an `nn.Linear(C, V)`), so that a trainer can compute logits only where a loss is taken, and
`forward(tokens) -> logits [B, T, V]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Mamba", "Transformer"]


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, H, T, D] (D even), the half-split layout."""
    T, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)      # [D/2]
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv            # [T, D/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp: bool, rope: bool, dropout: float):
        super().__init__()
        self.n_head, self.rope, self.dropout = n_head, rope, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model) if mlp else None
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False)) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = _rope(q), _rope(k)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, D]
        x = x + self.out(a.transpose(1, 2).reshape(B, T, C))
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    """A pre-LayerNorm GPT: token embedding, `n_layer` blocks of causal softmax attention (PyTorch's
    scaled_dot_product_attention) with an optional 4x GELU MLP, final LayerNorm, untied head.

    pos: "learned" (absolute embeddings for `max_len` positions: the model cannot run past them, as in
    Zoology's MQAR baseline) or "rope" (rotary: it runs at any length, and shows what happens past the
    length it was trained on)."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, n_head: int = 1, *, max_len: int = 2048,
                 pos: str = "learned", mlp: bool = True, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        if pos not in ("learned", "rope"):
            raise ValueError(f"pos must be 'learned' or 'rope', got {pos!r}")
        if d_model % n_head or (pos == "rope" and (d_model // n_head) % 2):
            raise ValueError(f"d_model={d_model} must split into {n_head} heads (of even size for rope)")
        self.max_len, self.pos = max_len, pos
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.emb = nn.Embedding(vocab_size, d_model)
            self.pos_emb = nn.Embedding(max_len, d_model) if pos == "learned" else None
            self.blocks = nn.ModuleList(_Block(d_model, n_head, mlp, pos == "rope", dropout)
                                        for _ in range(n_layer))
            self.ln_out = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size, bias=False)
            for name, p in self.named_parameters():  # GPT-2's init; residual outputs scaled by depth
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("out.weight", "mlp.2.weight")) else 0.02
                    nn.init.normal_(p, std=std)
        finally:
            torch.random.set_rng_state(gen_state)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> final-normed hidden states [B, T, C]."""
        n = tokens.shape[1]
        x = self.emb(tokens)
        if self.pos_emb is not None:
            if n > self.max_len:
                raise ValueError(f"{n} tokens is past this Transformer's {self.max_len} learned positions")
            x = x + self.pos_emb(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_out(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def selective_scan_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor) -> torch.Tensor:
    """Mamba's selective scan as written (autograd does the backward): from h_0 = 0,
    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t and y_t = h_t C_t, for each channel d of Di with its own
    state row h_t[d] of N numbers.

    x, dt [Bt, T, Di]; A [Di, N] (negative); B, C [Bt, T, N] -> y [Bt, T, Di]."""
    decay = torch.exp(dt.unsqueeze(-1) * A)                                         # [Bt, T, Di, N]
    inject = (dt * x).unsqueeze(-1) * B.unsqueeze(2)                                # [Bt, T, Di, N]
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    ys = []
    for t in range(x.shape[1]):
        h = decay[:, t] * h + inject[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, dim=1)


class _SelectiveScan(torch.autograd.Function):
    """`selective_scan_reference` with a hand-written backward (a reverse scan), one small op per step.

    Autograd through the reference builds [Bt, T, Di, N] tensors whose broadcast backward ops were 85 % of a
    training step (2-3 s at Bt=64, T=128, Di=128); here the only full-size tensor is the stored states."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C):
        Bt, T, Di = x.shape
        xs, dts, Bs, Cs = (t.transpose(0, 1).contiguous() for t in (x, dt, B, C))  # time-major
        hs = x.new_empty(T + 1, Bt, Di, A.shape[1])                                 # h_0 ... h_T
        hs[0].zero_()
        for t in range(T):
            decay = torch.exp(dts[t].unsqueeze(-1) * A)                             # [Bt, Di, N]
            inject = (dts[t] * xs[t]).unsqueeze(-1) * Bs[t].unsqueeze(1)
            torch.addcmul(inject, decay, hs[t], out=hs[t + 1])
        y = torch.einsum("tbdn,tbn->tbd", hs[1:], Cs)
        ctx.save_for_backward(xs, dts, A, Bs, Cs, hs)
        return y.transpose(0, 1)

    @staticmethod
    def backward(ctx, gy):
        xs, dts, A, Bs, Cs, hs = ctx.saved_tensors
        gys = gy.transpose(0, 1)
        T = xs.shape[0]
        gx, gdt, gB, gC = (torch.empty_like(t) for t in (xs, dts, Bs, Cs))
        gA = torch.zeros_like(A)
        g = torch.zeros_like(hs[0])                                                 # dL/dh_t, carried back
        for t in reversed(range(T)):
            gC[t] = torch.einsum("bdn,bd->bn", hs[t + 1], gys[t])
            g = g + gys[t].unsqueeze(-1) * Cs[t].unsqueeze(1)
            decay = torch.exp(dts[t].unsqueeze(-1) * A)
            g_log_decay = g * hs[t] * decay                                         # d/d(dt_t A)
            g_inject_in = torch.einsum("bdn,bn->bd", g, Bs[t])                      # d/d(dt_t x_t)
            gB[t] = torch.einsum("bdn,bd->bn", g, dts[t] * xs[t])
            gdt[t] = torch.einsum("bdn,dn->bd", g_log_decay, A) + g_inject_in * xs[t]
            gA += torch.einsum("bdn,bd->dn", g_log_decay, dts[t])
            gx[t] = g_inject_in * dts[t]
            g = g * decay
        return tuple(t.transpose(0, 1) for t in (gx, gdt)) + (gA,) + tuple(t.transpose(0, 1) for t in (gB, gC))


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor) -> torch.Tensor:
    """`selective_scan_reference`, fast: forward and backward are scans of one small op per step, time and memory
    linear in T (tests/experiments/test_baselines.py compares the two, values and gradients)."""
    return _SelectiveScan.apply(x, dt, A, B, C)


class _MambaMixer(nn.Module):
    """The Mamba-1 mixer with the parameter names of `transformers`' MambaMixer (so its weights load here)."""

    def __init__(self, d_model: int, state_size: int, expand: int = 2, conv_kernel: int = 4):
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.state_size = state_size
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, conv_kernel, groups=d_inner, padding=conv_kernel - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.zeros(d_inner, state_size))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        T = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)                                               # [B, T, Di] each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))                  # causal depthwise conv
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(self.dt_proj(dt))                                                     # [B, T, Di]
        y = selective_scan(x, dt, -torch.exp(self.A_log.float()), B, C) + x * self.D
        return self.out_proj(y * F.silu(z))


class _MambaBlock(nn.Module):
    def __init__(self, d_model: int, state_size: int):
        super().__init__()
        self.norm = _RMSNorm(d_model)
        self.mixer = _MambaMixer(d_model, state_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class _MambaBackbone(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layer: int, state_size: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(_MambaBlock(d_model, state_size) for _ in range(n_layer))
        self.norm_f = _RMSNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)


class Mamba(nn.Module):
    """Mamba-1 (Gu and Dao, 2023): `n_layer` Mamba blocks (expand 2, state 16, conv 4; no MLP), final RMSNorm,
    untied head. The weights are `transformers`' `MambaModel` (its initialisation, its parameter names: a
    `MambaModel` state dict loads into `.backbone`); the forward is this module's, because `transformers`' own
    CPU fallback took 20+ s for one training step of a 2-layer d=64 model at batch 64 x 128 tokens (this one:
    under a second). tests/experiments/test_baselines.py checks the two agree."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, *, state_size: int = 16, seed: int = 0):
        super().__init__()
        from transformers import MambaConfig, MambaModel

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            reference = MambaModel(MambaConfig(vocab_size=vocab_size, hidden_size=d_model, state_size=state_size,
                                               num_hidden_layers=n_layer, expand=2, conv_kernel=4,
                                               use_cache=False))
            self.backbone = _MambaBackbone(vocab_size, d_model, n_layer, state_size)
            self.backbone.load_state_dict(reference.state_dict())
            self.head = nn.Linear(d_model, vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=0.02)
        finally:
            torch.random.set_rng_state(gen_state)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone(tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))
