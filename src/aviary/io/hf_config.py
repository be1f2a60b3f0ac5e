"""The `config.json` written next to `model.safetensors` in a Hugging Face / fla model folder.

Only what each library needs to build the model is written; the field names are those of
transformers' `RwkvConfig` (hf-rwkv4), the RWKV-5/6 remote-code `Rwkv5Config` / `Rwkv6Config`
(hf-rwkv5, hf-rwkv6) and fla's `RWKV7Config` (fla-rwkv7). Reading a folder needs no config: every size
comes from the tensor shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from aviary.config import ModelConfig

__all__ = ["config_json"]

# RWKV World models: token 0 is the end-of-text separator, for both bos and eos
_COMMON = {"bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False, "use_cache": True}


# layout -> (architecture, model_type, context_length, per-head sizes in the config)
_HF_MODELS = {
    "hf-rwkv4": ("RwkvForCausalLM", "rwkv", 1024, False),
    "hf-rwkv5": ("Rwkv5ForCausalLM", "rwkv5", 4096, True),
    "hf-rwkv6": ("Rwkv6ForCausalLM", "rwkv6", 4096, True),
}


def _hf_rwkv(layout: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    architecture, model_type, context_length, heads = _HF_MODELS[layout]
    out = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "attention_hidden_size": config.n_embd,
        "intermediate_size": config.dim_ffn,
        "layer_norm_epsilon": 1e-5,
        "context_length": context_length,
        # halving the residual every 6 blocks keeps fp16 in range; in fp32/bf16 it only adds LayerNorm-eps
        # noise, so it is off there
        "rescale_every": 6 if dtype == torch.float16 else 0,
    }
    if heads:
        out.update(head_size=config.head_size, head_size_divisor=8, num_attention_heads=config.n_head)
    return out


def _fla_rwkv7(layout: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "head_dim": config.head_size,
        "intermediate_size": config.dim_ffn,
        "hidden_ratio": config.dim_ffn / config.n_embd,
        "decay_low_rank_dim": config.rank_w,
        "a_low_rank_dim": config.rank_a,
        "v_low_rank_dim": config.rank_v,
        "gate_low_rank_dim": config.rank_g,
        "value_dim": [config.n_embd] * config.n_layer,
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,  # fla's g_norm eps is head_dim * norm_eps = 64e-5, as official
        "hidden_act": "sqrelu",
    }


_BUILDERS = {**{layout: _hf_rwkv for layout in _HF_MODELS}, "fla-rwkv7": _fla_rwkv7}


def config_json(layout: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, Any] | None:
    """The config.json content for a folder in `layout`, or None for layouts that have none."""
    build = _BUILDERS.get(layout)
    if build is None:
        return None
    return {**build(layout, config, dtype), **_COMMON, "torch_dtype": str(dtype).removeprefix("torch.")}
