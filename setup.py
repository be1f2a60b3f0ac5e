"""Builds Aviary's C code; everything else about the package is in pyproject.toml.

- aviary.tokenizer._trie: the World tokenizer's core (required).
- aviary._kernels: the decode-time CPU kernels (src/aviary/csrc/: products, WKV steps, whole blocks, per
  instruction set, with their own pthread workers on Linux). Optional: without it, everything runs on
  torch's kernels. When it fails to build, the reason is written beside the package
  (aviary/_kernels.build-error.txt), where `aviary info --system` shows it.
"""

import sys
import traceback
from glob import glob
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

unix = sys.platform != "win32"
pthread = ["-pthread"] if sys.platform.startswith("linux") else []
ERROR_FILE = "_kernels.build-error.txt"


class BuildExt(build_ext):
    """build_ext that records why an optional extension failed (next to where it would have gone) and
    removes a stale record when it builds."""

    def build_extension(self, ext):
        note = Path(self.get_ext_fullpath(ext.name)).parent / ERROR_FILE
        try:
            super().build_extension(ext)
        except Exception as e:
            if ext.optional:
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(f"building {ext.name} failed: {e}\n\n{traceback.format_exc()}\n"
                                "Run `pip install -v -e .` to see the compiler's own messages.\n")
            raise
        if ext.optional and note.exists():
            note.unlink()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "aviary.tokenizer._trie",
            sources=["src/aviary/tokenizer/_trie.c"],
            extra_compile_args=["-O3"] if unix else [],
        ),
        Extension(
            "aviary._kernels",
            sources=sorted(glob("src/aviary/csrc/*.c")),
            depends=sorted(glob("src/aviary/csrc/*.h")),
            include_dirs=["src/aviary/csrc"],
            extra_compile_args=(["-O3"] if unix else []) + pthread,
            extra_link_args=pthread,
            libraries=["m"] if unix else [],  # expf / sqrtf in the WKV steps
            optional=True,
        ),
    ],
)
