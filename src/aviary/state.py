"""The recurrent state: a small typed value, batch dimension first.

An RWKV model's whole memory of the past is this object. Its size does not grow with the context.

Layout (one orientation for every version):

    shift: [B, L, 2, C]   the LayerNorm-ed input of the previous token, for the time-mix (index 0)
                          and the channel-mix (index 1) of each block ("token shift")
    wkv:   [B, L, *S]     float32 time-mix memory. S is per version:
                            v4:    (3, C)     rows num `aa`, den `bb`, max exponent `pp` (log-space)
                            v5-v7: (H, K, V)  per head, key index rows and value index columns,
                                              y = r^T S (v5/v6) or y = S^T r (v7); the same
                                              orientation as fla's `[B, H, K, V]`

The official layouts, and the one function that converts each (nowhere else):

    official `blocks.i.att.time_state` [H, V, K]        `time_state_to_wkv` / `wkv_to_time_state`
    the `rwkv` pip package's flat per-layer list        `from_pip_state` / `to_pip_state`
      (v7 keeps its wkv as [H, V, K] as well)

Forward calls return a new state and never modify the one passed in (unless asked to with
`inplace=True`), so branching a conversation is just keeping the old value.

Memory order: the states this module and the model make are laid out layer by layer (`layer_major`):
the shape is [B, L, ...], and each layer's [B, ...] slice is one contiguous block, which is what a
decode step reads and writes. The values do not depend on it; any layout is accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["RWKVState", "StateError", "from_pip_state", "layer_major", "time_state_to_wkv", "to_pip_state",
           "wkv_to_time_state"]


def layer_major(t: torch.Tensor) -> torch.Tensor:
    """A copy of t [B, L, ...] with memory ordered [L, B, ...] (each layer's slice contiguous). Always a
    copy, never a view: states are updated in place (`model(..., inplace=True)`)."""
    return t.transpose(0, 1).clone(memory_format=torch.contiguous_format).transpose(0, 1)


class StateError(ValueError):
    """A state that does not fit the model or file it is used with."""


@dataclass(frozen=True)
class RWKVState:
    version: int
    shift: torch.Tensor  # [B, L, 2, C]
    wkv: torch.Tensor  # [B, L, *S] float32

    def __post_init__(self) -> None:
        if self.shift.dim() != 4 or self.shift.shape[2] != 2:
            raise StateError(f"shift must be [B, L, 2, C], got {tuple(self.shift.shape)}")
        if self.wkv.shape[:2] != self.shift.shape[:2]:
            raise StateError(f"wkv {tuple(self.wkv.shape)} and shift {tuple(self.shift.shape)} disagree on [B, L]")

    @property
    def batch_size(self) -> int:
        return self.shift.shape[0]

    @property
    def n_layer(self) -> int:
        return self.shift.shape[1]

    @property
    def nbytes(self) -> int:
        return self.shift.numel() * self.shift.element_size() + self.wkv.numel() * self.wkv.element_size()

    @property
    def device(self) -> torch.device:
        return self.wkv.device

    def clone(self) -> RWKVState:
        return RWKVState(self.version, self.shift.clone(), self.wkv.clone())

    def detach(self) -> RWKVState:
        return RWKVState(self.version, self.shift.detach(), self.wkv.detach())

    def to(self, device: torch.device | str) -> RWKVState:
        return RWKVState(self.version, self.shift.to(device), self.wkv.to(device))

    def select(self, index: int | Sequence[int] | torch.Tensor) -> RWKVState:
        """The states of some batch rows, as a new state (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.shift.device)
        if idx.numel() and (idx.min() < -self.batch_size or idx.max() >= self.batch_size):
            raise IndexError(f"state batch index {idx.tolist()} out of range for batch size {self.batch_size}")
        return RWKVState(self.version, self.shift.transpose(0, 1)[:, idx].transpose(0, 1),
                         self.wkv.transpose(0, 1)[:, idx].transpose(0, 1))

    def expand(self, batch_size: int) -> RWKVState:
        """Repeat a batch-of-one state `batch_size` times (for a shared prefix)."""
        if self.batch_size != 1:
            raise StateError(f"expand needs a batch-of-one state, this one has batch {self.batch_size}")
        return RWKVState(self.version, layer_major(self.shift.expand(batch_size, *self.shift.shape[1:])),
                         layer_major(self.wkv.expand(batch_size, *self.wkv.shape[1:])))

    @staticmethod
    def cat(states: Sequence[RWKVState]) -> RWKVState:
        """Concatenate states along the batch dimension."""
        if not states:
            raise StateError("cannot concatenate an empty list of states")
        first = states[0]
        for s in states[1:]:
            if s.version != first.version or s.shift.shape[1:] != first.shift.shape[1:] \
                    or s.wkv.shape[1:] != first.wkv.shape[1:]:
                raise StateError("cannot concatenate states of different models")
        def cat(ts):  # along B of [L, B, ...] views: the result is layer-major
            return torch.cat([t.transpose(0, 1) for t in ts], dim=1).transpose(0, 1)

        return RWKVState(first.version, cat([s.shift for s in states]), cat([s.wkv for s in states]))

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically: a temporary file, then a rename). Errors are OSErrors
        naming the path, and nothing is left behind; an existing path that is not a regular file (a device,
        a FIFO, a directory) is refused rather than replaced by the rename."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"cannot save the state to {path}: it is a directory; name a file")
        if path.exists() and not path.is_file():
            raise OSError(f"cannot save the state to {path}: not a regular file (a device or a pipe?)")
        tmp = path.with_name(path.name + ".tmp")
        meta = {"format": "aviary-state", "version": str(self.version)}
        try:
            save_file({"shift": self.shift.contiguous().cpu(), "wkv": self.wkv.contiguous().cpu()}, str(tmp),
                      metadata=meta)
            os.replace(tmp, path)
        except SafetensorError as e:  # safetensors reports I/O errors as its own type, which is no OSError
            tmp.unlink(missing_ok=True)
            why = "no such directory" if not path.parent.is_dir() else str(e)
            raise OSError(f"cannot save the state to {path}: {why}") from e
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(f"cannot save the state to {path}: {e.strerror or e}") from e

    @staticmethod
    def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> RWKVState:
        """Read a file written by `save`. Every way a file can be wrong is a StateError naming it: not an
        Aviary state, no or a bad `version`, missing tensors, tensors that are not floating point, or
        values that are not finite (a NaN state makes every later logit NaN). Floating tensors of
        another precision are converted to float32, the precision of every state."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "aviary-state":
                    raise StateError(f"{path}: not an Aviary state file (metadata {json.dumps(meta)})")
                try:
                    version = int(meta["version"])
                except KeyError:
                    raise StateError(f"{path}: the state file's metadata has no 'version'") from None
                except ValueError:
                    raise StateError(f"{path}: the state file's 'version' {meta['version']!r} is not a "
                                     "number") from None
                missing = {"shift", "wkv"} - set(f.keys())
                if missing:
                    raise StateError(f"{path}: the state file has no {', '.join(sorted(missing))} tensor")
                tensors = {name: f.get_tensor(name) for name in ("shift", "wkv")}
        except (SafetensorError, OSError) as e:
            raise StateError(f"{path}: cannot read state file: {e}") from e
        for name, t in tensors.items():
            if not t.is_floating_point():
                raise StateError(f"{path}: the state's {name} tensor is {t.dtype}; a state is float32")
            if not bool(torch.isfinite(t).all()):
                raise StateError(f"{path}: the state's {name} tensor holds NaN or Inf values")
        try:
            return RWKVState(version, tensors["shift"].float().to(device), tensors["wkv"].float().to(device))
        except StateError as e:
            raise StateError(f"{path}: {e}") from None


# ---- the official layouts ----------------------------------------------------------------------------


def time_state_to_wkv(time_state: torch.Tensor) -> torch.Tensor:
    """Official `time_state` [..., H, V, K] (state tuning; also the pip package's RWKV-7 wkv) -> this
    library's wkv [..., H, K, V], float32."""
    return time_state.float().transpose(-1, -2)


def wkv_to_time_state(wkv: torch.Tensor) -> torch.Tensor:
    """This library's wkv [..., H, K, V] -> the official `time_state` orientation [..., H, V, K]."""
    return wkv.transpose(-1, -2)


def from_pip_state(version: int, state: Sequence[torch.Tensor]) -> RWKVState:
    """The `rwkv` pip package's state (its flat per-layer list, one sequence) -> a batch-of-one RWKVState
    (float32 copies: the pip package updates its list in place).

        v4:    5 per layer: att shift [C], aa, bb, pp [C], ffn shift [C]    -> wkv (3, C) = aa, bb, pp
        v5/v6: 3 per layer: att shift [C], wkv [H, K, V], ffn shift [C]     -> wkv as is
        v7:    3 per layer: att shift [C], wkv [H, V, K], ffn shift [C]     -> wkv transposed
    """
    per_layer = 5 if version == 4 else 3
    if len(state) % per_layer:
        raise StateError(f"an RWKV-{version} pip state has {per_layer} tensors per layer, this one has {len(state)}")
    layers = [[t.float() for t in state[i:i + per_layer]] for i in range(0, len(state), per_layer)]
    shift = torch.stack([torch.stack([layer[0], layer[-1]]) for layer in layers])  # [L, 2, C]
    if version == 4:
        wkv = torch.stack([torch.stack(layer[1:4]) for layer in layers])  # [L, 3, C]
    else:
        wkv = torch.stack([layer[1] for layer in layers])  # [L, H, N, N]
        if version == 7:
            wkv = time_state_to_wkv(wkv)
    return RWKVState(version, layer_major(shift[None]), layer_major(wkv[None]))


def to_pip_state(state: RWKVState) -> list[torch.Tensor]:
    """A batch-of-one RWKVState -> the `rwkv` pip package's flat per-layer list (float32; the inverse of
    `from_pip_state`), e.g. to continue a conversation in the pip package."""
    if state.batch_size != 1:
        raise StateError(f"the pip package keeps one sequence per state; this one has batch {state.batch_size}")
    out: list[torch.Tensor] = []
    for shift, wkv in zip(state.shift[0].float(), state.wkv[0], strict=True):
        if state.version == 4:
            out += [shift[0].clone(), *(w.clone() for w in wkv), shift[1].clone()]
        else:
            wkv = wkv_to_time_state(wkv) if state.version == 7 else wkv
            out += [shift[0].clone(), wkv.clone(memory_format=torch.contiguous_format), shift[1].clone()]
    return out
