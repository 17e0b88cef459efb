"""Log lines: both formats carry a call's structured fields, and a processor's lines say which it is."""

from __future__ import annotations

import logging

import orjson

from deploy.logs import JsonFormatter, TextFormatter
from processors.runtime import _Tagged


def _record(msg: str, extra: dict[str, object], exc: bool = False) -> logging.LogRecord:
    logger = logging.getLogger("keyyo.test")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError as caught:
            exc_info = (type(caught), caught, caught.__traceback__)
    return logger.makeRecord("keyyo.test", logging.INFO, __file__, 1, msg, (), exc_info, extra=extra)


def test_text_lines_carry_the_same_fields_as_json_lines() -> None:
    extra = {"topic": "keyyo.notifications.v1", "partition": 3, "source": "checkpoint", "none": None}
    text = TextFormatter().format(_record("partition restored", extra))
    assert text.endswith("keyyo.test: partition restored topic=keyyo.notifications.v1 partition=3 "
                         "source=checkpoint none=null")
    entry = orjson.loads(JsonFormatter().format(_record("partition restored", extra)))
    assert {key: entry[key] for key in extra} == extra


def test_text_values_that_would_be_ambiguous_are_quoted() -> None:
    text = TextFormatter().format(_record("m", {"error": 'a b="c"', "empty": "", "line": "x\ny"}))
    assert text.endswith(' error="a b=\\"c\\"" empty="" line="x\\ny"')


def test_a_traceback_stays_below_the_fields() -> None:
    lines = TextFormatter().format(_record("failed", {"partition": 1}, exc=True)).splitlines()
    assert lines[0].endswith("failed partition=1")
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"


def test_a_processors_lines_name_it_beside_their_own_fields() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger, keep = logging.getLogger("keyyo.test.tagged"), Keep()
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        _Tagged(logger, {"processor": "acd-stats"}).info("partition restored", extra={"partition": 2})
    finally:
        logger.removeHandler(keep)
    assert (seen[0].processor, seen[0].partition) == ("acd-stats", 2)  # type: ignore[attr-defined]
