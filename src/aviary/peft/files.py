"""Adapter files: writing them, reading ours and RWKV-PEFT's, and merging one into a base checkpoint.

An adapter file is a flat name -> tensor map with exactly RWKV-PEFT's key names, `.pth` (torch.save) or
`.safetensors`:

    blocks.N.<target>.lora_A [r, in], .lora_B [out, r]     LoRA, PiSSA
    blocks.N.<target>.disha  [r, out] | [in/r, r, r]       MiSS bone | bat
    blocks.N.att.time_state  [H, V, K]                     state tuning
    any official name (blocks.N.ln1.weight, emb.weight)    parts trained in full

What RWKV-PEFT's readers ignore: the settings (method, rank, alpha, ...) and the sizes of the model the adapter
is for, as JSON in the safetensors header's metadata or, for `.pth`, in a sidecar `NAME.json`. PiSSA's initial
factors go beside the adapter in `NAME.init_pissa.pth` (or `.safetensors`), keys `model.blocks.N.<target>.
init_lora_A` / `init_lora_B` as RWKV-PEFT's `init_pissa.pth` (whose `merge/merge.py` reads them).

A file without our settings is read as RWKV-PEFT's: the method from the key names (`lora_A`: LoRA, or PiSSA
when an `init_pissa.pth` is beside it; `disha`: MiSS, the mode from its shape; only `time_state`: state), the
rank from the shapes. RWKV-PEFT does not record LoRA's alpha: it must be given (`read_adapter(path, alpha=...)`,
`aviary merge --alpha`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aviary.io import CheckpointError
from aviary.io.checkpoint import _read_file, first_sentence, weight_files
from aviary.peft.config import PeftConfig
from aviary.peft.layers import lora_merged, miss_merged, pissa_residual
from aviary.peft.tuning import adapter_state_dict, peft_config

__all__ = ["Adapter", "AdapterError", "merge", "read_adapter", "save_adapter"]

FORMAT = "aviary-adapter"
SUFFIXES = (".pth", ".safetensors")
ADAPTER_LEAVES = ("lora_A", "lora_B", "disha")
PARTS_VOCABULARY = ("ln", "time", "emb", "head")  # RWKV-PEFT's train_parts
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(lora_A|lora_B|disha|time_state)$")


class AdapterError(ValueError):
    """An adapter that does not fit the model it is applied to."""


@dataclass
class Adapter:
    """An adapter read from a file (`read_adapter`): its settings, its tensors (RWKV-PEFT's names),
    PiSSA's initial factors (`{module}.init_lora_A/B`, no `model.` prefix), the sizes of the model it was made
    for when the file says (`ModelConfig` fields), and where it came from."""

    config: PeftConfig
    tensors: dict[str, torch.Tensor]
    init_pissa: dict[str, torch.Tensor] | None = None
    model: dict | None = None
    path: Path | None = None
    notes: list[str] = field(default_factory=list)  # how the settings were found, for `aviary merge` to print


# ---- writing ------------------------------------------------------------------------------------------------


def _companions(path: Path) -> tuple[Path, Path]:
    """(sidecar settings file of a .pth, PiSSA's initial factors) beside `path`."""
    return path.with_suffix(".json"), path.with_name(f"{path.stem}.init_pissa{path.suffix}")


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically (a temporary file, then a rename); failures are OSErrors naming `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except Exception as e:  # a full disk, in the words of torch or safetensors
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: cannot write: {first_sentence(e)}") from None


def _model_sizes(model) -> dict:
    c = model.config
    return {"version": c.version, "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
            "head_size": c.head_size, "dim_ffn": c.dim_ffn}


def save_adapter(model, config: PeftConfig | None, path: str | os.PathLike, *,
                 dtype: torch.dtype | None = None) -> list[Path]:
    """Write the adapter of `model` (made by `apply_peft`) to `path` (.pth or .safetensors) and return the files
    written: the adapter, its settings (`.pth`: a sidecar NAME.json) and, for PiSSA, NAME.init_pissa.<ext>.
    config: the settings to record (default: the model's own); dtype: cast the tensors (default: keep)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: an adapter file ends in .pth or .safetensors")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder to write {path.name} into")
    config = config or peft_config(model)
    if config is None:
        raise ValueError("this model has no adapter (call aviary.peft.apply_peft first)")

    def ready(sd, dtype=dtype):
        return {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in sd.items()}

    sidecar, init_path = _companions(path)
    meta = {"format": FORMAT, "peft": config.to_dict(), "model": _model_sizes(model)}
    written = []
    if config.method == "pissa":
        init = {f"model.{name}.{t}": getattr(m, t) for name, m in model.named_modules()
                if hasattr(m, "init_lora_A") for t in ("init_lora_A", "init_lora_B")}
        # never cast: a merge rebuilds the trained residual W - B₀A₀ from exactly these numbers
        _write(ready(init, None), init_path, {"format": FORMAT + "-init-pissa"})
        meta["init_pissa"] = init_path.name
        written.append(init_path)
    text = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items() if k != "format"}}
    _write(ready(adapter_state_dict(model)), path, text)
    written.insert(0, path)
    if path.suffix == ".pth":
        sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        written.insert(1, sidecar)
    return written


# ---- reading ------------------------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor file, read safely (aviary.io: weights-only unpickling, claims checked first)."""
    sd = {}
    for f in weight_files(path):
        sd.update(_read_file(f))
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"entries that are not tensors: {bad[:5]}")
    for prefix in ("_forward_module.", "model."):  # DeepSpeed's and Lightning's wrappers, when every key has it
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def _metadata(path: Path) -> dict | None:
    """Our settings: the safetensors header's metadata, or a .pth's sidecar JSON; None for RWKV-PEFT's files."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        if raw.get("format") != FORMAT:
            return None
        try:
            return {"format": FORMAT, **{k: json.loads(v) for k, v in raw.items() if k != "format"}}
        except json.JSONDecodeError as e:
            raise CheckpointError(path, f"the adapter's metadata is not valid JSON: {e}") from None
    sidecar = _companions(path)[0]
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(sidecar, f"cannot read the adapter's settings: {first_sentence(e)}") from None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _infer(path: Path, tensors: dict[str, torch.Tensor], init_beside: bool) -> tuple[dict, list[str]]:
    """Settings of an RWKV-PEFT file from its key names and shapes."""
    leaves: dict[str, set[str]] = {}
    for k in tensors:
        m = _BLOCK_KEY.match(k)
        if m:
            leaves.setdefault(m.group(3), set()).add(m.group(2))
    kinds = {"lora" if leaf.startswith("lora") else leaf for leaf in leaves}
    if len(kinds) > 1:
        raise CheckpointError(path, f"holds tensors of several methods ({', '.join(sorted(kinds))}); an adapter "
                                    "has one")
    notes = []
    adapter_keys = {k for k in tensors if _BLOCK_KEY.match(k)}
    parts = sorted({p for k in tensors if k not in adapter_keys for p in PARTS_VOCABULARY if p in k}
                   | {k for k in tensors if k not in adapter_keys and not any(p in k for p in PARTS_VOCABULARY)})
    if not kinds:
        if not tensors:
            raise CheckpointError(path, "holds no tensors")
        raise CheckpointError(path, "holds no adapter tensors (lora_A/lora_B, disha or time_state): a full "
                                    "checkpoint, not an adapter?")
    kind = kinds.pop()
    d: dict = {"parts": parts}
    if kind == "time_state":
        d["method"] = "state"
        return d, ["read as an RWKV-PEFT state-tuning file"]
    targets = sorted(set.union(*leaves.values()))
    key = "lora_A" if kind == "lora" else "disha"
    shapes = {tuple(tensors[k].shape) for k in tensors if k.endswith("." + key)}
    if kind == "lora":
        ranks = {s[0] for s in shapes}
        d["method"] = "pissa" if init_beside else "lora"
        beside = " (init_pissa.pth beside it)" if init_beside else ""
        notes.append(f"read as an RWKV-PEFT {d['method']} file{beside}")
    else:
        dims = {len(s) for s in shapes}
        if dims not in ({2}, {3}):
            raise CheckpointError(path, f"disha tensors of shapes {sorted(shapes)}: neither MiSS bone [r, out] nor "
                                        "bat [in/r, r, r]")
        d["method"], d["miss_mode"] = "miss", "bone" if dims == {2} else "bat"
        ranks = {s[0] if len(s) == 2 else s[-1] for s in shapes}
        notes.append(f"read as an RWKV-PEFT MiSS ({d['miss_mode']}) file")
    if len(ranks) != 1:
        raise CheckpointError(path, f"{key} tensors of different ranks {sorted(ranks)}")
    d["rank"], d["targets"] = ranks.pop(), targets
    return d, notes


def read_adapter(path: str | os.PathLike, **overrides) -> Adapter:
    """An adapter file: ours (`save_adapter`) or RWKV-PEFT's (see the module docstring). `overrides` replace
    settings (PeftConfig fields), and `init_pissa=PATH` names PiSSA's initial factors. An RWKV-PEFT LoRA file
    needs `alpha`. Raises CheckpointError naming the file."""
    path = Path(path)
    init_override = overrides.pop("init_pissa", None)
    if path.exists() and not path.is_dir() and path.suffix not in SUFFIXES:
        raise CheckpointError(path, "an adapter file ends in .pth or .safetensors")
    tensors = _tensors(path)
    meta = _metadata(path)
    init_path = Path(init_override) if init_override else None
    notes: list[str] = []
    if meta is not None:
        settings = dict(meta.get("peft") or {})
        if init_path is None and meta.get("init_pissa"):
            init_path = path.with_name(meta["init_pissa"])
    else:
        beside = path.with_name("init_pissa.pth")
        settings, notes = _infer(path, tensors, init_path is not None or beside.is_file())
        if settings["method"] == "pissa" and init_path is None:
            init_path = beside
        if settings["method"] == "lora" and "alpha" not in overrides and overrides.get("method") != "pissa":
            raise CheckpointError(path, "an RWKV-PEFT LoRA file does not record lora_alpha: give it (aviary merge "
                                        "--alpha, --adapter-alpha, read_adapter(path, alpha=...)); the merged "
                                        "update is (alpha / rank) B A")
    settings.update(overrides)
    try:
        config = PeftConfig.from_dict(settings).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"adapter settings: {e}") from None
    init = None
    if config.method == "pissa":
        if init_path is None or not init_path.is_file():
            where = f" ({init_path} does not exist)" if init_path else ""
            raise CheckpointError(path, f"a PiSSA adapter needs its initial factors (init_pissa) to merge{where}; "
                                        "give their file: init_pissa=PATH")
        init = _tensors(init_path)
    return Adapter(config, tensors, init, meta.get("model") if meta else None, path, notes)


# ---- merging ------------------------------------------------------------------------------------------------


def _describe(sizes: dict) -> str:
    return (f"RWKV-{sizes.get('version')} L{sizes.get('n_layer')}-D{sizes.get('n_embd')} (vocabulary "
            f"{sizes.get('vocab_size')}, ffn {sizes.get('dim_ffn')}, head size {sizes.get('head_size')})")


def _layers(sd: dict) -> int:
    return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()),
                   default=-1)


def merge(base_sd: dict[str, torch.Tensor], adapter: Adapter, *, dtype: torch.dtype | None = None
          ) -> dict[str, torch.Tensor]:
    """An official-format state dict: `base_sd` (official names) with `adapter` merged in, for every method:
    LoRA W + (alpha/r) B A; PiSSA (W - B₀ A₀) + B A; MiSS W + ΔW; state: `blocks.N.att.time_state` added (or
    replaced); parts: replaced. Merged weights are computed in float32 and stored in `dtype` (default: the base
    weight's). Raises AdapterError when the adapter does not fit the base (another size, unknown names)."""
    from aviary.config import infer_config
    from aviary.model import VERSIONS

    cfg, tensors = adapter.config, adapter.tensors
    out = dict(base_sd)
    n_layer = _layers(base_sd)
    config = infer_config({k: v for k, v in base_sd.items() if not k.endswith(".att.time_state")})
    if adapter.model:  # the sizes recorded by save_adapter: the clearest message for another model
        base = {k: getattr(config, k, None) for k in adapter.model}
        if base != adapter.model:
            raise AdapterError(f"the adapter was made for {_describe(adapter.model)}, the base model is "
                               f"{_describe(base)}")
    if _layers(tensors) > n_layer:
        raise AdapterError(f"the adapter has tensors for {_layers(tensors)} layers, the base model has {n_layer}: "
                           "an adapter for another model")
    handled = set()
    if cfg.method == "state":
        spec = VERSIONS[config.version]
        if not spec.state_tuning:
            raise AdapterError(f"RWKV-{config.version} has no matrix state: a state-tuning adapter cannot apply")
        shape = spec.time_state_shape(config)
        for i in range(n_layer):
            key = f"blocks.{i}.att.time_state"
            if key not in tensors:
                raise AdapterError(f"the state-tuning adapter has no {key}")
            if tuple(tensors[key].shape) != shape:
                raise AdapterError(f"{key} is {list(tensors[key].shape)}, this RWKV-{config.version} model's is "
                                   f"{list(shape)}: an adapter for another model")
            out[key] = tensors[key].to(dtype or base_sd["emb.weight"].dtype)
            handled.add(key)
    else:
        modules = sorted({m.group(1, 2) for k in tensors if (m := _BLOCK_KEY.match(k)) and m.group(3) != "time_state"},
                         key=lambda m: (int(m[0]), m[1]))
        for layer, target in modules:
            prefix = f"blocks.{layer}.{target}"
            w = base_sd.get(f"{prefix}.weight")
            if w is None or w.dim() != 2:
                raise AdapterError(f"the adapter adapts {prefix}, which the base model has no matrix for")
            out[f"{prefix}.weight"] = _merged(cfg, adapter, prefix, w).to(dtype or w.dtype)
            handled |= {k for k in tensors if k.startswith(prefix + ".") and k.rsplit(".", 1)[1] in ADAPTER_LEAVES}
    for key in sorted(set(tensors) - handled):  # the parts trained in full
        if key not in base_sd:
            raise AdapterError(f"the adapter's {key} is not a tensor of the base model: an adapter for another "
                               "model (or version)")
        if tuple(tensors[key].shape) != tuple(base_sd[key].shape):
            raise AdapterError(f"the adapter's {key} is {list(tensors[key].shape)}, the base model's "
                               f"{list(base_sd[key].shape)}: an adapter for another model")
        out[key] = tensors[key].to(dtype or base_sd[key].dtype)
    return out


def _need(tensors: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise AdapterError(f"the adapter has no {key}")
    if tuple(t.shape) != shape:
        raise AdapterError(f"{key} is {list(t.shape)}, expected {list(shape)} for the base model's weight: an adapter "
                           "for another model (or another rank)")
    return t


def _merged(cfg: PeftConfig, adapter: Adapter, prefix: str, w: torch.Tensor) -> torch.Tensor:
    out_f, in_f = w.shape
    r, t = cfg.rank, adapter.tensors
    if cfg.method in ("lora", "pissa"):
        a, b = _need(t, f"{prefix}.lora_A", (r, in_f)), _need(t, f"{prefix}.lora_B", (out_f, r))
        if cfg.method == "lora":
            return lora_merged(w, a, b, cfg.scale)
        init = adapter.init_pissa or {}
        init_a, init_b = (init.get(f"{prefix}.init_lora_{s}") for s in "AB")
        if init_a is None or init_b is None:
            raise AdapterError(f"PiSSA's initial factors have no {prefix}.init_lora_A/B")
        if tuple(init_a.shape) != (r, in_f) or tuple(init_b.shape) != (out_f, r):
            raise AdapterError(f"PiSSA's initial factors of {prefix} do not fit its weight {list(w.shape)}")
        return lora_merged(pissa_residual(w, init_a, init_b), a, b, 1.0)
    shape = (r, out_f) if cfg.miss_mode == "bone" else (in_f // r, r, r)
    if cfg.miss_mode == "bat" and (in_f % r or out_f % r):
        raise AdapterError(f"MiSS bat rank {r} does not divide {prefix}'s weight {list(w.shape)}")
    return miss_merged(w, _need(t, f"{prefix}.disha", shape))

