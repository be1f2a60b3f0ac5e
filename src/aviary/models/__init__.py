"""Models shipped inside the package: the project's own small RWKV-7, trained with `aviary train`
(see MODEL_CARD.md beside it). It is the default of `aviary generate`, `aviary chat` and `aviary serve`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path"]

HERE = Path(__file__).resolve().parent
WEIGHT_SUFFIXES = (".safetensors", ".pth")


def default_model_path() -> Path:
    """The bundled model file. Raises FileNotFoundError if this installation has none."""
    found = sorted(p for p in HERE.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        what = "no bundled model" if not found else f"{len(found)} bundled models ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{what} in {HERE}; give a MODEL checkpoint path")
    return found[0]
