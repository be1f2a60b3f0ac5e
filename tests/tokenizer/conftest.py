"""The tokenizers that both test files here use, built once per module."""

from __future__ import annotations

import pytest

from aviary.tokenizer import NeoXTokenizer, WorldTokenizer


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def pytok() -> WorldTokenizer:
    return WorldTokenizer(backend="python")


@pytest.fixture(scope="module")
def neox() -> NeoXTokenizer:
    return NeoXTokenizer()
