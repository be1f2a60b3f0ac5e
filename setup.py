"""Builds Aviary's C code; everything else about the package is in pyproject.toml.

- aviary.tokenizer._trie: the World tokenizer's core (required).
- aviary._kernels: a weight-only int8 matrix-vector kernel with OpenMP (optional: without it, or
  without a compiler that knows -fopenmp, int8 models use torch's own kernel).
"""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []

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
            extra_compile_args=(["-O3"] if unix else []) + openmp,
            extra_link_args=openmp,
            optional=True,
        ),
    ]
)
