"""Putting a method on a model and taking it off: `apply_peft`, the adapter's tensors in and out, the merged
official state dict, the trainable count."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from aviary.peft.config import PeftConfig
from aviary.peft.layers import AdaptedLinear, LoraLinear, MissLinear
from aviary.state import wkv_to_time_state

if TYPE_CHECKING:
    from aviary.model import RWKV

__all__ = ["adapter_state_dict", "apply_peft", "load_adapter_state_dict", "merged_state_dict", "peft_config",
           "trainable_parameters"]

# where apply_peft records what it did on the model (plain attributes: not parameters, not in the state dict)
_CONFIG, _PARTS = "peft_config", "_peft_parts"


def peft_config(model: nn.Module) -> PeftConfig | None:
    """The config `apply_peft` put on `model`, or None."""
    return getattr(model, _CONFIG, None)


def _adapted(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def _products(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def _wrap(model, config: PeftConfig, generator: torch.Generator) -> None:
    version = model.config.version
    for i, block in enumerate(model.blocks):
        for target in config.targets:
            try:
                linear = block.get_submodule(target)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear) or linear.bias is not None:
                what = "an int8-quantised product (fine-tune a float model)" if linear is not None \
                    and type(linear).__name__ == "Int8Linear" else "not a bias-free linear layer"
                raise ValueError(f"peft target {target!r} of blocks.{i} is {what}; the products of an RWKV-{version} "
                                 f"block are {', '.join(_products(block))}")
            weight = linear.weight.detach()
            if config.method == "miss":
                module: AdaptedLinear = MissLinear(weight, config.rank, config.miss_mode)
            else:
                module = LoraLinear(weight, config.rank, config.scale, config.dropout)
                if config.method == "lora":
                    module.init_lora(generator)
                else:
                    module.init_pissa(config.pissa_niter)
            parent, _, name = target.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, name, module)


def _add_time_state(model) -> None:
    spec, cfg = model.spec, model.config
    if not spec.state_tuning:
        raise ValueError(f"RWKV-{cfg.version} has no matrix state to tune: state tuning needs RWKV-5, 6 or 7 "
                         "(use lora, pissa or miss)")
    dtype, device = model.emb.weight.dtype, model.device
    start = None if model.initial_wkv is None else wkv_to_time_state(model.initial_wkv)  # [L, H, V, K]
    for i, block in enumerate(model.blocks):
        # a model that already starts from a tuned state (a state-tuned checkpoint) continues from it
        value = torch.zeros(spec.time_state_shape(cfg)) if start is None else start[i]
        block.att.time_state = nn.Parameter(value.to(device=device, dtype=dtype))


def apply_peft(model: RWKV, config: PeftConfig, *, seed: int = 0) -> RWKV:
    """Put `config`'s method on `model` (an aviary RWKV) in place and return it: every parameter frozen, the
    targets wrapped (LoRA, PiSSA, MiSS) or a `blocks.N.att.time_state` added to each time-mix (state), and the
    parameters named by `config.parts` un-frozen.

    Deterministic in (base weights, config, seed): LoRA's A is drawn from a generator seeded with `seed`, and
    PiSSA's randomised SVD runs in a forked RNG seeded with it, so a resumed run rebuilds the same frozen
    residual bit for bit. Zero-initialised adapters (LoRA, MiSS, a zero state) leave the logits unchanged."""
    config.validate()
    if peft_config(model) is not None:
        raise ValueError(f"this model already has a {peft_config(model).method} adapter; apply one method once")
    if getattr(model, "rescale_every", 0):
        raise ValueError("the model has the fp16 layer rescale applied; fine-tune in float32 or bfloat16")
    model.requires_grad_(False)
    if config.method == "state":
        _add_time_state(model)
    else:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global CPU generator
            torch.manual_seed(seed)
            _wrap(model, config, generator)
    frozen_under_adapter = {f"{name}.weight" for name in _adapted(model)}
    parts = []
    for part in config.parts:
        hits = [n for n, _ in model.named_parameters() if part in n and n not in frozen_under_adapter]
        if not hits:
            raise ValueError(f"peft part {part!r} matches no parameter of this RWKV-{model.config.version} model "
                             "(RWKV-PEFT's parts: ln, time, emb, head)")
        parts += hits
    chosen = set(parts)
    for name, p in model.named_parameters():
        if name in chosen:
            p.requires_grad_(True)
    setattr(model, _PARTS, tuple(n for n, _ in model.named_parameters() if n in chosen))
    setattr(model, _CONFIG, config)
    return model


def _adapter_names(model) -> list[str]:
    config = peft_config(model)
    if config is None:
        raise ValueError("this model has no adapter (call aviary.peft.apply_peft first)")
    names = [f"{prefix}.{n}" for prefix, m in _adapted(model).items() for n in m.adapter_names]
    if config.method == "state":
        names += [f"blocks.{i}.att.time_state" for i in range(len(model.blocks))]
    return names + [n for n in getattr(model, _PARTS) if n not in names]


def adapter_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """The adapter's tensors under RWKV-PEFT's names (`blocks.N.att.key.lora_A`, `...lora_B`, `...disha`,
    `blocks.N.att.time_state`, then the un-frozen parts under their official names): what an adapter file and
    a fine-tuning checkpoint hold. Detached tensors that share the model's memory."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in _adapter_names(model)}


def load_adapter_state_dict(model: RWKV, sd: dict[str, torch.Tensor]) -> None:
    """Copy `sd` into the adapter of `model` (made by `apply_peft` with the same config), strictly: a missing,
    extra or mis-shaped name is a ValueError listing them. Values keep the model's dtype and device."""
    want = {n: p for n, p in model.named_parameters() if n in set(_adapter_names(model))}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{n}: given {tuple(sd[n].shape)}, model {tuple(p.shape)}" for n, p in want.items()
             if n in sd and tuple(sd[n].shape) != tuple(p.shape)]
    problems = [f"{what} {names[:6]}{' ...' if len(names) > 6 else ''}"
                for what, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong)) if names]
    if problems:
        raise ValueError(f"the adapter does not fit this model ({peft_config(model).method}, rank "
                         f"{peft_config(model).rank}): {'; '.join(problems)}")
    with torch.no_grad():
        for n, p in want.items():
            p.copy_(sd[n])


def merged_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """The official-format state dict of `model` with every adapter merged into its weight (`merged_weight`)
    and the tuned start state, if any, as `blocks.N.att.time_state` [H, V, K]; loadable by `aviary.load` and
    the `rwkv` pip package. A model without an adapter gives its plain state dict."""
    adapted = _adapted(model)
    extra = {f"{prefix}.{n}" for prefix, m in adapted.items() for n in m.adapter_names}
    out = {}
    for name, t in model.state_dict().items():
        prefix = name.removesuffix(".weight")
        if name in extra:
            continue
        out[name] = adapted[prefix].merged_weight() if prefix in adapted and name.endswith(".weight") else t
    if not any(k.endswith(".att.time_state") for k in out) and model.initial_wkv is not None:
        tuned = wkv_to_time_state(model.initial_wkv).to(model.emb.weight.dtype)
        out.update((f"blocks.{i}.att.time_state", t.contiguous()) for i, t in enumerate(tuned))
    return out


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers the optimizer updates: the parameters that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

