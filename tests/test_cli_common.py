"""Helpers shared by the verbs that run a model (aviary/commands/_common.py)."""

import pytest

from aviary.commands._common import unescape


@pytest.mark.parametrize("typed, meant", [
    (r"a\nb", "a\nb"),
    (r"\t\r\0", "\t\r\0"),
    (r"back\\n", "back\\n"),
    (r"\x41\u00e9\U0001F600", "A\u00e9\U0001F600"),
    ("caf\u00e9\\n", "caf\u00e9\n"),
    # not escapes: kept as typed (the probe's `aviary generate M "C:\xfiles"` was an error)
    (r"C:\xfiles", r"C:\xfiles"),
    (r"\q \x4", r"\q \x4"),
    (r"\ud800", r"\ud800"),  # a lone surrogate could not be encoded later
    (r"\UFFFFFFFF", r"\UFFFFFFFF"),
])
def test_unescape(typed, meant):
    assert unescape(typed) == meant
