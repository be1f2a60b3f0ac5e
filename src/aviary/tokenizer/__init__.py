"""Tokenizers: the RWKV World tokenizer (RWKV-5/6/7, RWKV-4 World) and the GPT-NeoX 20B tokenizer (RWKV-4 Pile).

    >>> import aviary
    >>> tok = aviary.load_tokenizer(version=7)     # the World tokenizer
    >>> tok.decode(tok.encode("Hello, 世界 👋"))
    'Hello, 世界 👋'
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from aviary.tokenizer.base import StreamDecoder, Tokenizer
from aviary.tokenizer.neox import NeoXTokenizer
from aviary.tokenizer.world import WorldTokenizer

__all__ = ["NeoXTokenizer", "StreamDecoder", "Tokenizer", "WorldTokenizer", "load_tokenizer", "tokenizer_for_version"]

# The tokenizer a model of each RWKV version was released with. RWKV-4 also has World models (name the
# tokenizer explicitly for those: load_tokenizer("world")).
TOKENIZER_FOR_VERSION = {4: "20b", 5: "world", 6: "world", 7: "world"}
BUILTIN = {"world": WorldTokenizer, "20b": NeoXTokenizer}


@functools.cache
def _builtin(name: str) -> Tokenizer:
    return BUILTIN[name]()  # tokenizers hold no per-call state, so one instance serves everyone


def tokenizer_for_version(version: int) -> Tokenizer:
    """The tokenizer RWKV-`version` models were released with: 4 -> 20B (Pile models), 5/6/7 -> World."""
    if version not in TOKENIZER_FOR_VERSION:
        raise ValueError(f"no tokenizer for RWKV version {version!r}; known versions: {sorted(TOKENIZER_FOR_VERSION)}")
    return _builtin(TOKENIZER_FOR_VERSION[version])


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, version: int | None = None) -> Tokenizer:
    """A tokenizer by name ("world", "20b"), by file (a World vocabulary .txt or a `tokenizers` .json), or,
    with no name, the one for RWKV `version` (default: World). The bundled ones are loaded once and shared."""
    if name_or_path is None:
        return tokenizer_for_version(7 if version is None else version)
    name = str(name_or_path)
    if name.lower() in BUILTIN:
        return _builtin(name.lower())
    if name.lower() == "neox":
        return _builtin("20b")
    path = Path(name)
    if path.suffix == ".txt":
        return WorldTokenizer(path)
    if path.suffix == ".json":
        return NeoXTokenizer(path)
    raise ValueError(f"unknown tokenizer {name!r}: use 'world', '20b', a World vocabulary .txt file "
                     "or a tokenizers .json file")
