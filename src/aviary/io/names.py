"""Key-name layouts of RWKV checkpoints and the maps between them and the official BlinkDL names.

A layout is data: renames of the keys outside the blocks (`emb`, `ln_out`, `head`), the prefix of the
blocks, renames of a block's parts (`ln0`, `att`, `ffn`) and of the names inside each part, plus the
few tensors whose shape differs. One function applies a layout in either direction.

    official   blocks.3.att.time_mix_k           emb.weight              head.weight
    hf-rwkv4   rwkv.blocks.3.attention.time_mix_key   rwkv.embeddings.weight  head.weight
    fla-rwkv7  model.layers.3.attn.r_proj.weight  model.embeddings.weight  lm_head.weight

The Hugging Face layouts (transformers' `RwkvForCausalLM`, and the remote code of RWKV/v5-Eagle-*-HF
and RWKV/v6-Finch-*-HF) share one set of renames; which of the three a file is follows from its version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from aviary.config import detect_version

__all__ = ["LAYOUTS", "PIP_CONVERTED_MARKERS", "Layout", "from_official", "get_layout", "library_layout",
           "to_official"]

Tensors = dict[str, torch.Tensor]

# keys the rwkv pip package adds to files it has converted (pre-transposed, possibly int8)
PIP_CONVERTED_MARKERS = ("_strategy", "_version", "_rescale_layer")
DEEPSPEED_PREFIX = "_forward_module."  # DeepSpeed stage-3 wrapper (RWKV-LM train.py strips it too)


@dataclass(frozen=True)
class KeyMap:
    """Renames from one naming to another. Every table maps a dotted prefix to a dotted prefix; a prefix
    matches whole segments only, the longest match wins."""

    top: Mapping[str, str]  # keys outside the blocks: "emb" -> "rwkv.embeddings"
    blocks: tuple[str, str]  # block list prefix: ("blocks", "rwkv.blocks")
    parts: Mapping[str, str]  # a block's children: "att" -> "attention"
    inner: Mapping[str, Mapping[str, str]]  # per (source) part, the names inside it

    def inverse(self) -> KeyMap:
        flip = _flip
        return KeyMap(top=flip(self.top), blocks=self.blocks[::-1], parts=flip(self.parts),
                      inner={self.parts.get(p, p): flip(t) for p, t in self.inner.items()})

    def apply(self, key: str) -> str:
        """The name of `key` on the other side, or `key` itself when no rule matches."""
        prefix = self.blocks[0] + "."
        if not key.startswith(prefix):
            return _swap_prefix(key, self.top)
        index, _, rest = key[len(prefix):].partition(".")
        part, _, leaf = rest.partition(".")
        new_part = self.parts.get(part, part)
        if leaf:
            leaf = _swap_prefix(leaf, self.inner.get(part, {}))
            new_part = f"{new_part}.{leaf}"
        return f"{self.blocks[1]}.{index}.{new_part}"


def _flip(table: Mapping[str, str]) -> dict[str, str]:
    flipped = {v: k for k, v in table.items()}
    assert len(flipped) == len(table), f"rename table is not one-to-one: {table}"
    return flipped


def _swap_prefix(name: str, table: Mapping[str, str]) -> str:
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return name


@dataclass(frozen=True)
class Layout:
    """A naming of RWKV checkpoints.

    versions:   the RWKV generations this layout can hold
    marker:     a key that every file in this layout has, and no other layout has
    names:      official -> layout renames
    transposed: official names (after `blocks.i.`) stored transposed in this layout
    flattened:  official names stored as [C] instead of [1, 1, C]
    dropped:    official keys this layout does not store (`restore` puts them back)
    restore:    fills in what a layout lacks, on the official side, after renaming
    """

    name: str
    versions: tuple[int, ...]
    marker: str
    names: KeyMap | None = None
    transposed: frozenset[str] = frozenset()
    flattened: frozenset[str] = frozenset()
    dropped: frozenset[str] = frozenset()
    restore: Callable[[Tensors], Tensors] | None = field(default=None, compare=False)

    def tensor_to_layout(self, official_key: str, t: torch.Tensor) -> torch.Tensor:
        inner = _inner_name(official_key)
        if inner in self.transposed:
            return t.t()
        if inner in self.flattened:
            return t.reshape(-1)
        return t

    def tensor_to_official(self, official_key: str, t: torch.Tensor) -> torch.Tensor:
        inner = _inner_name(official_key)
        if inner in self.transposed:
            return t.t().contiguous()
        if inner in self.flattened:
            return t.reshape(1, 1, -1)
        return t


def _inner_name(official_key: str) -> str:
    """'blocks.3.att.w1' -> 'att.w1'; keys outside the blocks are returned unchanged."""
    if official_key.startswith("blocks."):
        return official_key.split(".", 2)[2]
    return official_key


# ---- the layouts ----------------------------------------------------------------------------------

# transformers' RwkvForCausalLM (convert_rwkv_checkpoint_to_hf.py) and the RWKV-5/6 remote code
_HF_MIX = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance",
           "time_mix_g": "time_mix_gate"}  # time_mix_g exists in v5 only; v6 keeps its time_maa_* names
_HF_NAMES = KeyMap(
    top={"emb": "rwkv.embeddings", "ln_out": "rwkv.ln_out", "head": "head"},
    blocks=("blocks", "rwkv.blocks"),
    parts={"ln0": "pre_ln", "att": "attention", "ffn": "feed_forward"},
    inner={"att": _HF_MIX, "ffn": _HF_MIX},
)

# fla-hub RWKV-7 (fla/models/rwkv7, utils/convert_from_rwkv7.py). A LoRA there is
# Sequential(Linear(C, r, bias=False), act, Linear(r, C)): w1 is lora.0's weight transposed, w2 lora.2's
# weight transposed, and w0 lora.2's bias. g has no bias; layer 0 has no v LoRA at all.
_FLA_LORA = {f"{x}{i}": f"{x}_lora.lora.{where}" for x in "wavg"
             for i, where in (("0", "2.bias"), ("1", "0.weight"), ("2", "2.weight"))}
_FLA_NAMES = KeyMap(
    top={"emb": "model.embeddings", "ln_out": "model.norm", "head": "lm_head"},
    blocks=("blocks", "model.layers"),
    parts={"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn", "ffn": "ffn"},
    inner={"att": {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
                   "ln_x": "g_norm", **{k: v for k, v in _FLA_LORA.items() if k != "g0"}}},
)
_LAYER0_V = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
_FLA_X_ORDER = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # rows of the packed `x_x` of older fla files


def _restore_fla(sd: Tensors) -> Tensors:
    """Put back what official files have and fla files lack.

    Layer 0's v0/v1/v2 exist in official files but are never used (layer 0 sets v_first and skips the
    value residual), so zeros stand in. Older fla files pack x_r..x_g into one `x_x` [6, C]."""
    sd = dict(sd)
    for key in [k for k in sd if k.endswith(".att.x_x")]:
        packed = sd.pop(key)
        for name, row in zip(_FLA_X_ORDER, packed, strict=True):
            sd[key[: -len("x_x")] + name] = row.reshape(1, 1, -1)
    if "blocks.0.att.v0" not in sd and "blocks.0.att.w0" in sd:
        w0 = sd["blocks.0.att.w0"]
        C = w0.numel()
        # a one-layer model has no v LoRA anywhere: its rank is unknowable and unused, any will do
        rank = sd["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in sd else 32
        for key, shape in zip(_LAYER0_V, ((1, 1, C), (C, rank), (rank, C)), strict=True):
            sd[key] = torch.zeros(shape, dtype=w0.dtype)
    return sd


_LAYOUT_LIST = (
    Layout("official", versions=(4, 5, 6, 7), marker="emb.weight"),
    Layout("hf-rwkv4", versions=(4,), marker="rwkv.embeddings.weight", names=_HF_NAMES),
    Layout("hf-rwkv5", versions=(5,), marker="rwkv.embeddings.weight", names=_HF_NAMES),
    Layout("hf-rwkv6", versions=(6,), marker="rwkv.embeddings.weight", names=_HF_NAMES),
    Layout("fla-rwkv7", versions=(7,), marker="model.embeddings.weight", names=_FLA_NAMES,
           transposed=frozenset(f"att.{x}{i}" for x in "wavg" for i in "12"),
           flattened=frozenset({"att.k_k", "att.k_a", "att.w0", "att.a0", "att.v0", "ffn.x_k"}),
           dropped=frozenset(_LAYER0_V), restore=_restore_fla),
)
_BY_NAME = {layout.name: layout for layout in _LAYOUT_LIST}
LAYOUTS = tuple(_BY_NAME)


def library_layout(version: int) -> str:
    """The Hugging Face or fla layout that holds `version` (what a model folder is written in)."""
    return next(layout.name for layout in _LAYOUT_LIST
                if layout.names is not None and version in layout.versions)


def get_layout(name: str) -> Layout:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose one of {LAYOUTS}") from None


# ---- conversion -----------------------------------------------------------------------------------

def _detect_family(sd: Mapping[str, torch.Tensor]) -> str:
    """The marker key present in `sd`; exactly one must be."""
    markers = sorted({layout.marker for layout in _LAYOUT_LIST} & set(sd))
    if len(markers) == 1:
        return markers[0]
    if markers:
        raise ValueError(f"keys of several layouts are mixed in one file: {markers}")
    raise ValueError(
        "unknown key layout: none of "
        f"{sorted({layout.marker for layout in _LAYOUT_LIST})} is present; first keys are {sorted(sd)[:6]}")


def to_official(sd: Mapping[str, torch.Tensor]) -> tuple[Tensors, str]:
    """Rename a state dict in any known layout to official names; return it and the layout's name.

    Tensors keep their dtype. Raises ValueError for an unknown layout or a file converted by the
    rwkv pip package (whose tensors are transposed and possibly int8)."""
    if any(k in sd for k in PIP_CONVERTED_MARKERS):
        raise ValueError("this file was converted by the rwkv pip package for one strategy "
                         "(transposed, maybe int8); load the original checkpoint instead")
    sd = {k.removeprefix(DEEPSPEED_PREFIX): v for k, v in sd.items()}
    marker = _detect_family(sd)
    # layouts that share a marker share their renames too (hf-rwkv4/5/6); the version picks one of them
    family = [layout for layout in _LAYOUT_LIST if layout.marker == marker]
    reader = family[0]
    if reader.names is None:
        return sd, reader.name
    names = reader.names.inverse()
    out = {}
    for key, t in sd.items():
        official = names.apply(key)
        out[official] = reader.tensor_to_official(official, t)
    if reader.restore is not None:
        out = reader.restore(out)
    version = detect_version(out)
    held = [layout.name for layout in family if version in layout.versions]
    if not held:
        raise ValueError(f"key {marker!r} marks the {'/'.join(layout.name for layout in family)} layout, "
                         f"which cannot hold the RWKV-{version} model these keys describe")
    return out, held[0]


def from_official(sd: Mapping[str, torch.Tensor], layout: str) -> Tensors:
    """Rename an official state dict to `layout`. Raises ValueError if the layout cannot hold the
    model's version (e.g. hf-rwkv4 for an RWKV-7 model)."""
    target = get_layout(layout)
    if target.names is None:
        return dict(sd)
    version = detect_version(sd)
    if version not in target.versions:
        held = ", ".join(f"RWKV-{v}" for v in target.versions)
        raise ValueError(f"layout {layout} holds {held} only; this model is RWKV-{version}")
    return {target.names.apply(k): target.tensor_to_layout(k, t) for k, t in sd.items()
            if k not in target.dropped}
