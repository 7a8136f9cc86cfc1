"""Log lines never hold a traceback: an exception is logged as its type and message."""

from airouter.logs import exception_in_one_line


def test_an_exception_becomes_its_type_and_message() -> None:
    try:
        raise KeyError("something no validation foresaw")
    except KeyError:
        logged = exception_in_one_line(None, "error", {"event": "engine_failed", "exc_info": True})
    assert logged == {
        "event": "engine_failed",
        "error_type": "KeyError",
        "error": "'something no validation foresaw'",
    }
    error = ValueError("bad value")
    logged = exception_in_one_line(None, "warning", {"event": "x", "exc_info": error})
    assert logged == {"event": "x", "error_type": "ValueError", "error": "bad value"}
    # An error the line names itself is kept; a line without one is left alone.
    kept = {"event": "x", "error": "mine", "exc_info": (ValueError, error, None)}
    assert exception_in_one_line(None, "error", kept)["error"] == "mine"
    assert exception_in_one_line(None, "info", {"event": "y"}) == {"event": "y"}
