"""Request checks that run before anything reaches llama.cpp."""

import pytest

from airouter.errors import InvalidArgument
from modelhost.generation import Sampling, resolve_max_tokens, validate_messages, validate_stop


def test_defaults_are_valid() -> None:
    Sampling().validate()


def test_boundaries_are_inclusive_where_documented() -> None:
    Sampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=2.0).validate()
    Sampling(temperature=2.0, top_k=1000, min_p=1.0, repetition_penalty=0.5).validate()


def test_infinite_values_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match=r"sampling\.min_p"):
        Sampling(min_p=float("inf")).validate()


def test_max_tokens_defaults_to_the_context_left() -> None:
    assert resolve_max_tokens(None, prompt_tokens=100, context=512, model="m") == 412


def test_max_tokens_may_fill_the_context_exactly() -> None:
    assert resolve_max_tokens(412, prompt_tokens=100, context=512, model="m") == 412
    with pytest.raises(InvalidArgument, match="between 1 and 412"):
        resolve_max_tokens(413, prompt_tokens=100, context=512, model="m")


def test_a_prompt_filling_the_whole_context_leaves_no_room() -> None:
    with pytest.raises(InvalidArgument, match="the prompt is 512 tokens"):
        resolve_max_tokens(None, prompt_tokens=512, context=512, model="m")


def test_stop_list_limits() -> None:
    validate_stop(["a"] * 16)
    with pytest.raises(InvalidArgument, match="at most 16"):
        validate_stop(["a"] * 17)
    with pytest.raises(InvalidArgument, match=r"stopping.stop\[1\]"):
        validate_stop(["ok", "x" * 257])


def test_known_roles_pass() -> None:
    validate_messages([("system", "s"), ("user", "u"), ("assistant", "a")])
