"""Random-weight checkpoints in the official format, for tests, examples and benchmarks.

No model can be downloaded on the machines this project is built on, so loading code is exercised on
files like these: official key names and shapes, values drawn from ranges like those of trained
models (decays in a realistic band, mixes in [0, 1], matrices scaled by 1/sqrt(fan_in)), so that
outputs are neither constant nor overflowing. They are not trained models: they produce noise.
"""

from __future__ import annotations

import math
import os

import torch

from aviary.config import ModelConfig

__all__ = ["ByteTokenizer", "random_config", "random_state_dict", "save_random_checkpoint"]


# Tests use the LoRA ranks of a new model of this width at every width, so that the shapes of test models (and
# the golden files made from them, tests/data/golden) do not change with the width asked for.
TEST_LORA_WIDTH = 768


def random_config(version: int, n_layer: int = 2, n_embd: int = 128, vocab_size: int = 300,
                  head_size: int = 64, dim_ffn: int | None = None) -> ModelConfig:
    """A small config with the version's default ffn width for `n_embd` and the default LoRA ranks of a
    768-wide model (`VersionSpec.default_sizes`)."""
    from aviary.model import VERSIONS

    spec = VERSIONS[version]
    ranks = {k: v for k, v in spec.default_sizes(TEST_LORA_WIDTH).items() if k.startswith("rank_")}
    sizes = {"head_size": head_size, **spec.default_sizes(n_embd), **ranks}
    if dim_ffn is not None:
        sizes["dim_ffn"] = dim_ffn
    return ModelConfig(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, **sizes)


def _fill(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    def rand(lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    leaf = name.rsplit(".", 1)[-1]
    if ".ln" in name or name.startswith("ln_out."):  # ln0/ln1/ln2/ln_out/ln_x
        return 1 + randn(0.1) if leaf == "weight" else randn(0.1)
    if leaf.startswith(("time_mix_", "x_")) or (leaf.startswith("time_maa_") and leaf[-1] not in "12"):
        return rand()
    if leaf == "time_decay":
        return rand(-3.0, 1.0)
    if leaf in ("time_first", "time_faaaa", "w0", "a0", "v0"):
        return randn(0.5)
    if leaf == "k_k":
        return rand(0.5, 1.0)
    if leaf == "k_a":
        return rand()
    if leaf == "r_k":
        return randn(0.3)
    if leaf == "time_state":
        return randn(0.3)
    if leaf[-1] in "12" and leaf[:-1] in ("time_maa_w", "time_decay_w", "w", "a", "v", "g"):
        return randn(0.1)
    if name == "emb.weight":
        return randn()
    if leaf == "weight" and len(shape) == 2:  # every Linear: [out, in]
        return randn(1 / math.sqrt(shape[1]))
    raise KeyError(f"no random rule for {name}")


def random_state_dict(config: ModelConfig, seed: int = 0, time_state: bool = False,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An official-format state dict for `config` with random values (see module docstring).

    time_state: also add `blocks.i.att.time_state` [H, N, N] ([H, V, K]) as a state-tuned file has.
    """
    from aviary.model import RWKV, VERSIONS

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RWKV(config).state_dict().items()}
    if time_state:
        spec = VERSIONS[config.version]
        if not spec.state_tuning:
            raise ValueError(f"RWKV-{config.version} has no time_state")
        for i in range(config.n_layer):
            shapes[f"blocks.{i}.att.time_state"] = torch.Size(spec.time_state_shape(config))
    g = torch.Generator().manual_seed(seed)
    return {k: _fill(k, s, g).to(dtype) for k, s in shapes.items()}


def save_random_checkpoint(path: str | os.PathLike, config: ModelConfig, seed: int = 0,
                           time_state: bool = False) -> dict[str, torch.Tensor]:
    """Write `random_state_dict(...)` to `path` (.pth or .safetensors) and return it."""
    from aviary.io import write_state_dict

    sd = random_state_dict(config, seed=seed, time_state=time_state)
    write_state_dict(sd, path)
    return sd


class ByteTokenizer:
    """A byte-level tokenizer with the World tokenizer's first ids: 0 is end of document, id b+1 is
    byte b. Enough to drive generation on small random models (vocab >= 257) in tests and examples."""

    vocab_size = 257
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode_bytes(self, ids) -> bytes:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is not a byte token (0..256)")
        return bytes(i - 1 for i in ids if i)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
