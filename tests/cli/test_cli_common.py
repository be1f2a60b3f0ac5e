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


# --- sampling options, /set and the server's fields: all made from aviary.generation.params.SETTINGS -------


def _sampling_parser(max_tokens=200):
    import argparse

    from aviary.commands._common import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, max_tokens=max_tokens)
    return parser


def test_cli_sampling_defaults_are_the_reference_pipelines():
    from aviary.commands._common import sampling_params
    from aviary.generation import SamplingParams

    assert sampling_params(_sampling_parser(500).parse_args([])) == SamplingParams.reference(max_new_tokens=500)
    assert SamplingParams.reference() == SamplingParams(top_p=0.85, presence_penalty=0.2, frequency_penalty=0.2,
                                                        penalty_decay=0.996)


def test_every_flag_sets_its_field():
    from aviary.commands._common import sampling_params

    argv = ["-n", "7", "--temperature", "0.5", "--top-p", "0.3", "--top-k", "4", "--min-p", "0.05",
            "--presence-penalty", "0.1", "--frequency-penalty", "0.4", "--penalty-decay", "0.9",
            "--stop", r"\n\n", "--stop", "User:", "--ban", "3", "--ban", "5", "--seed", "11"]
    p = sampling_params(_sampling_parser().parse_args(argv), stop_token_ids=())
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (7, 0.5, 0.3, 4, 0.05)
    assert (p.presence_penalty, p.frequency_penalty, p.penalty_decay) == (0.1, 0.4, 0.9)
    assert p.stop == ("\n\n", "User:") and p.banned_tokens == (3, 5) and p.seed == 11 and p.stop_token_ids == ()
    text = _sampling_parser().format_help()
    assert "--top-p TOP_P" in text and "(default 0.85)" in text and "--ban ID" in text and "(default 200)" in text


@pytest.mark.parametrize("assignment, field, value", [
    ("temperature=0.7", "temperature", 0.7),
    ("top-k = 3", "top_k", 3),
    ("max_new_tokens=300", "max_new_tokens", 300),
    (r"stop=\n\n,User:,", "stop", ("\n\n", "User:")),
    ("banned_tokens=1, 2", "banned_tokens", (1, 2)),
    ("stop_token_ids=", "stop_token_ids", ()),
    ("seed=5", "seed", 5),
    ("seed=None", "seed", None),
])
def test_set_parses_every_kind_of_setting(assignment, field, value):
    from aviary.commands._common import parse_setting
    from aviary.generation import SamplingParams

    assert getattr(parse_setting(assignment, SamplingParams(seed=1)), field) == value


@pytest.mark.parametrize("assignment, message", [
    ("bogus=1", "NAME one of max_new_tokens, temperature"),
    ("temperature", "NAME one of"),
    ("top_p=7", "top_p"),
    ("top_k=1.5", "invalid literal for int"),
    ("banned_tokens=a", "invalid literal for int"),
])
def test_set_refuses_bad_settings(assignment, message):
    from aviary.commands._common import parse_setting
    from aviary.generation import SamplingParams

    with pytest.raises(ValueError, match=message):
        parse_setting(assignment, SamplingParams())
