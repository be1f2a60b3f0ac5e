"""Builds the World tokenizer's C core; everything else about the package is in pyproject.toml."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aviary.tokenizer._trie",
            sources=["src/aviary/tokenizer/_trie.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
        )
    ]
)
