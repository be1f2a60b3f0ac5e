"""Builds the World tokenizer's C core; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aviary.tokenizer._trie",
            sources=["src/aviary/tokenizer/_trie.c"],
            extra_compile_args=["-O3", "-std=c11"],
        )
    ]
)
