"""TextStream: whole characters only, stop strings cut and held back correctly."""

from modelhost.text_stream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(p) for p in pieces]


def test_a_character_split_across_tokens_is_emitted_whole() -> None:
    emoji = "🙂".encode()  # 4 bytes
    stream = TextStream([])
    assert feed_all(stream, [emoji[:1], emoji[1:3], emoji[3:] + b"!"]) == ["", "", "🙂!"]


def test_invalid_bytes_become_replacement_characters() -> None:
    stream = TextStream([])
    out = "".join(feed_all(stream, [b"ok \xff", b"\xfe there"])) + stream.flush()
    assert out == "ok \ufffd\ufffd there"


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement() -> None:
    stream = TextStream([])
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.flush() == "\ufffd"


def test_stop_string_across_tokens_cuts_the_text_before_it() -> None:
    stream = TextStream(["<END>"])
    out = feed_all(stream, [b"Hello <E", b"N", b"D> ignored"])
    assert "".join(out) == "Hello "
    assert stream.stopped and stream.matched == "<END>"
    assert stream.feed(b"more") == "" and stream.flush() == ""


def test_text_that_only_looks_like_a_stop_string_is_released() -> None:
    stream = TextStream(["<END>"])
    assert stream.feed(b"a <EN") == "a "
    assert stream.feed(b"O") == "<ENO"
    assert not stream.stopped and stream.matched == ""


def test_held_text_is_flushed_when_generation_ends_otherwise() -> None:
    stream = TextStream(["###"])
    assert stream.feed(b"x #") == "x "
    assert stream.flush() == "#"


def test_the_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(["bb", "a"])
    assert stream.feed(b"xxbbya") == "xx"
    assert stream.matched == "bb"  # what Anthropic's stop_sequence reports
