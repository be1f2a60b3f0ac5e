"""`aviary.load`: from a checkpoint on disk to a ready model, in one call; `load_start_state`: the state a
model starts from, from an Aviary state file or an official state-tuning file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from aviary.config import ConfigError, ModelConfig, infer_config
from aviary.hugepages import move_to_huge_pages
from aviary.io import CheckpointError, read_state_dict, read_time_state
from aviary.model import RWKV, VERSIONS
from aviary.model.rescale import apply_rescale, default_rescale
from aviary.state import RWKVState, StateError, time_state_to_wkv

if TYPE_CHECKING:
    from aviary.peft import Adapter

__all__ = ["check_state_dict", "expected_shapes", "load", "load_start_state", "model_from_state_dict"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose float32, bfloat16 or float16")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config` with its shape, without building a model of `config`'s
    depth: blocks 1, 2, ... are all alike, so a model of at most two blocks on the meta device says it."""
    with torch.device("meta"):
        template = RWKV(replace(config, n_layer=min(config.n_layer, 2))).state_dict()
    shapes = {}
    for key, t in template.items():
        if key.startswith("blocks.1."):
            rest = key.removeprefix("blocks.1.")
            shapes.update((f"blocks.{i}.{rest}", tuple(t.shape)) for i in range(1, config.n_layer))
        else:
            shapes[key] = tuple(t.shape)
    return shapes


def _listed(names: list[str], n: int) -> str:
    return f"{names[:n]}{' ...' if len(names) > n else ''}"


def check_state_dict(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Check that official-named `sd` (real or meta tensors) describes one complete model, before
    anything is built: block indices 0..L-1, every tensor there with its expected shape, nothing extra,
    and a state-tuned `blocks.i.att.time_state` [H, N, N] for every layer or none. Returns the config;
    raises ConfigError listing what is wrong."""
    time_state = sorted(k for k in sd if k.endswith(".att.time_state"))
    weights = {k: v for k, v in sd.items() if not k.endswith(".att.time_state")}
    config = infer_config(weights)
    want = expected_shapes(config)
    if time_state:
        spec = VERSIONS[config.version]
        if not spec.state_tuning:
            raise ConfigError(f"RWKV-{config.version} has no time_state, but the file holds {_listed(time_state, 3)}")
        state_shape = spec.time_state_shape(config)
        want.update((f"blocks.{i}.att.time_state", state_shape) for i in range(config.n_layer))
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k}: file {tuple(sd[k].shape)}, model {want[k]}" for k in want
             if k in sd and tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(missing, 6)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(unexpected, 6)}")
    if wrong:
        problems.append(f"shape mismatch {_listed(wrong, 4)}")
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def _not_finite(sd: Mapping[str, torch.Tensor], chunk: int = 1 << 22) -> list[str]:
    """The tensors holding a NaN or an infinity. A model with one never produces anything but NaN
    logits, which sampling turns into an empty reply. Read in chunks: no copy of a whole tensor."""
    bad = []
    for key, t in sd.items():
        if t.is_meta:
            continue
        for part in t.detach().reshape(-1).split(chunk):
            if part.dtype.itemsize == 1:  # float8: no min/max kernels
                part = part.float()
            if part.numel() == 0:
                continue
            low, high = torch.aminmax(part)  # a NaN anywhere makes both NaN
            if not (torch.isfinite(low) and torch.isfinite(high)):
                bad.append(key)
                break
    return bad


def model_from_state_dict(sd: dict[str, torch.Tensor], *, backend: str = "chunked") -> RWKV:
    """Build a model whose config is inferred from official-named `sd`, and load `sd` into it strictly.

    `blocks.i.att.time_state` tensors (state tuning, [H, V, K]) become the model's initial state.
    Tensors keep their dtype and device; use `.to()` afterwards. Raises ConfigError for a state dict
    that does not describe a complete model (`check_state_dict`), or whose weights hold NaN or infinity.
    """
    config = check_state_dict(sd)
    bad = _not_finite(sd)
    if bad:
        where = bad[0] if len(bad) == 1 else f"{len(bad)} tensors {_listed(bad, 4)}"
        raise ConfigError(f"NaN or infinite values in {where}: the weights are broken "
                          "(saved from a diverged training run?)")
    sd = dict(sd)
    time_state = {k: sd.pop(k) for k in [k for k in sd if k.endswith(".att.time_state")]}
    with torch.device("meta"):
        model = RWKV(config, backend=backend)
    model.load_state_dict(sd, strict=True, assign=True)
    if time_state:
        wkv = torch.stack([time_state[f"blocks.{i}.att.time_state"] for i in range(config.n_layer)])
        model.set_initial_state(time_state_to_wkv(wkv))
    return model.eval()


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         backend: str = "chunked", rescale_every: int | None = None, quantize: str | None = None,
         huge_pages: bool = True, adapter: str | os.PathLike | Adapter | None = None) -> RWKV:
    """Load an RWKV-4/5/6/7 checkpoint: official `.pth`, safetensors, or a Hugging Face / fla folder.

    dtype:          float32 or bfloat16 (CPU and GPU), float16 (GPU; v4-v6 then halve the residual
                    every `rescale_every` layers, default 6, to stay in fp16 range)
    backend:        how sequences run: a backend of the version's time-mix op (`aviary.ops.backends_of`):
                    "chunked" (parallel form), "recurrent" (reference loop), or a GPU one such as "fla"
                    (RWKV-5/6/7 on CUDA, `pip install aviary[gpu]`); a name the version lacks is a ValueError
    quantize:       None, or "int8": int8 weight-only block linears and head (`RWKV.quantize`, aviary.quant)
    huge_pages:     on a CPU, copy the large weights onto transparent huge pages where Linux offers them
                    (`aviary.hugepages`: faster single-stream decode, docs/benchmarks.md, Design
                    measurements item 8); False keeps them where they were loaded (a memory-mapped fp32
                    checkpoint then stays shared page cache)
    adapter:        a fine-tuning adapter (LoRA, PiSSA, MiSS, state; ours or RWKV-PEFT's file), as a path or an
                    `aviary.peft.Adapter` (`read_adapter(path, alpha=...)` for RWKV-PEFT's LoRA files), merged into
                    the weights here (`aviary.peft.merge`, in float32, stored in `dtype`): the model is then a plain
                    one and decodes at full speed
    Raises CheckpointError naming the file for anything it cannot read or understand.
    """
    torch_dtype = _dtype(dtype)
    sd, _layout = read_state_dict(path)
    if adapter is not None:
        sd = _merge_adapter(sd, adapter, path, torch_dtype)
    try:
        model = model_from_state_dict(sd, backend=backend)
    except ConfigError as e:
        raise CheckpointError(path, str(e)) from None
    del sd  # the model holds the tensors now: casting below can free each original as it goes
    model = model.to(device=device, dtype=torch_dtype)
    if model.initial_wkv is not None:
        model.initial_wkv = model.initial_wkv.to(device)
    if rescale_every is None:
        rescale_every = default_rescale(model.spec, torch_dtype)
    if rescale_every:
        apply_rescale(model, rescale_every)
    if quantize is not None:
        model.quantize(quantize)
    if huge_pages and torch.device(device).type == "cpu":
        move_to_huge_pages(model)
    return model


def _merge_adapter(sd: dict[str, torch.Tensor], adapter, base_path, dtype: torch.dtype
                   ) -> dict[str, torch.Tensor]:
    from aviary.peft import Adapter, AdapterError, merge, read_adapter

    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    try:
        return merge(sd, adapter, dtype=dtype)
    except (AdapterError, ConfigError) as e:
        raise CheckpointError(adapter.path or "adapter", f"does not fit the model in {base_path}: {e}") from None


def load_start_state(model: RWKV, path: str | os.PathLike, device: str | torch.device = "cpu") -> RWKVState | None:
    """The state to start from, in `path`: an Aviary state file (`RWKVState.save`, chat's /save) is
    returned as a batch-of-one state; an official state-tuning file (`blocks.N.att.time_state` tensors,
    alone or beside the weights) becomes `model`'s initial state, so that every new sequence starts from
    it, and None is returned. Raises StateError naming the file: neither kind of file, a time_state that is
    not floating point or holds NaN/Inf, or a state that does not fit `model`."""
    try:
        state = RWKVState.load(path, device=device)
    except StateError as not_ours:
        try:
            wkv = read_time_state(path)
        except CheckpointError as not_official:
            raise StateError(f"{path}: neither an Aviary state file ({not_ours}) nor a state-tuning file "
                             f"({not_official})") from None
        if not wkv.is_floating_point() or not bool(torch.isfinite(wkv).all()):
            why = f"is {wkv.dtype}" if not wkv.is_floating_point() else "holds NaN or Inf values"
            raise StateError(f"{path}: the state-tuning file's time_state {why}") from None
        try:
            model.set_initial_state(time_state_to_wkv(wkv).to(device))
        except StateError as e:
            raise StateError(f"{path}: {e}") from None
        return None
    try:
        model.check_state(state, 1)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None
    return state
