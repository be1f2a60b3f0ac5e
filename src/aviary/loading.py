"""`aviary.load`: from a checkpoint on disk to a ready model, in one call."""

from __future__ import annotations

import os

import torch

from aviary.config import ConfigError, ModelConfig, infer_config
from aviary.hugepages import move_to_huge_pages
from aviary.io import CheckpointError, read_state_dict
from aviary.model import RWKV

__all__ = ["load", "model_from_state_dict"]

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


def _check_shapes(model: RWKV, sd: dict[str, torch.Tensor]) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k}: file {tuple(sd[k].shape)}, model {want[k]}" for k in want
             if k in sd and tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if wrong:
        problems.append(f"shape mismatch {wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
    if problems:
        raise ConfigError("; ".join(problems))


def model_from_state_dict(sd: dict[str, torch.Tensor], *, backend: str = "chunked") -> RWKV:
    """Build a model whose config is inferred from official-named `sd`, and load `sd` into it strictly.

    `blocks.i.att.time_state` tensors (state tuning, [H, V, K]) become the model's initial state.
    Tensors keep their dtype and device; use `.to()` afterwards.
    """
    sd = dict(sd)
    time_state = {k: sd.pop(k) for k in [k for k in sd if k.endswith(".att.time_state")]}
    config: ModelConfig = infer_config(sd)
    with torch.device("meta"):
        model = RWKV(config, backend=backend)
    _check_shapes(model, sd)
    model.load_state_dict(sd, strict=True, assign=True)
    if time_state:
        if len(time_state) != config.n_layer:
            raise ConfigError(f"time_state found for {len(time_state)} of {config.n_layer} layers")
        wkv = torch.stack([time_state[f"blocks.{i}.att.time_state"] for i in range(config.n_layer)])
        model.set_initial_state(wkv.float().transpose(-1, -2))  # official [H, V, K] -> ours [H, K, V]
    return model.eval()


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         backend: str = "chunked", rescale_every: int | None = None, quantize: str | None = None,
         huge_pages: bool = True) -> RWKV:
    """Load an RWKV-4/5/6/7 checkpoint: official `.pth`, safetensors, or a Hugging Face / fla folder.

    dtype:          float32 or bfloat16 (CPU and GPU), float16 (GPU; v4-v6 then halve the residual
                    every `rescale_every` layers, default 6, to stay in fp16 range)
    backend:        how sequences run: "chunked" (parallel form) or "recurrent" (reference loop)
    quantize:       None, or "int8": int8 weight-only block linears and head (`RWKV.quantize`, aviary.quant)
    huge_pages:     on a CPU, copy the large weights onto transparent huge pages where Linux offers them
                    (`aviary.hugepages`: 10-17 % faster single-stream decode here); False keeps them where
                    they were loaded (a memory-mapped fp32 checkpoint then stays shared page cache)
    Raises CheckpointError naming the file for anything it cannot read or understand.
    """
    torch_dtype = _dtype(dtype)
    sd, _layout = read_state_dict(path)
    try:
        model = model_from_state_dict(sd, backend=backend)
    except ConfigError as e:
        raise CheckpointError(path, str(e)) from None
    model = model.to(device=device, dtype=torch_dtype)
    if model.initial_wkv is not None:
        model.initial_wkv = model.initial_wkv.to(device)
    if rescale_every is None:
        rescale_every = 6 if torch_dtype == torch.float16 and model.arch.SUPPORTS_RESCALE else 0
    if rescale_every:
        model.apply_rescale(rescale_every)
    if quantize is not None:
        model.quantize(quantize)
    if huge_pages and torch.device(device).type == "cpu":
        move_to_huge_pages(model)
    model._update_thread_split()  # decides and records the decode path (model.decode_path)
    return model
