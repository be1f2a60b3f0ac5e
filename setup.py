"""Builds Aviary's C code; everything else about the package is in pyproject.toml.

- aviary.tokenizer._trie: the World tokenizer's core (required).
- aviary._kernels: the decode-time matrix products for float32, bfloat16 and int8 weights, with their
  own pthread workers on Linux (optional: without it, every product uses torch's kernels).
"""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
pthread = ["-pthread"] if sys.platform.startswith("linux") else []

setup(
    ext_modules=[
        Extension(
            "aviary.tokenizer._trie",
            sources=["src/aviary/tokenizer/_trie.c"],
            extra_compile_args=["-O3"] if unix else [],
        ),
        Extension(
            "aviary._kernels",
            sources=["src/aviary/_kernels.c"],
            extra_compile_args=(["-O3"] if unix else []) + pthread,
            extra_link_args=pthread,
            libraries=["m"] if unix else [],  # expf / sqrtf in the WKV steps
            optional=True,
        ),
    ]
)
