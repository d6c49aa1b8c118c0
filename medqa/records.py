"""Reading record files that may be hostile: one error type that says which file, which
record and which field and what was expected; JSON that refuses repeated keys and runaway
nesting; the field checks every task's reader shares."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Input that medqa cannot use, with where it came from and what was expected."""


def require_field(raw: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(raw)})")
    return raw[key]


def require_str_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}")
    return value


def require_text(value: Any, key: str, where: str) -> str:
    """A string that can be written as UTF-8 (JSON's \\ud800 escapes give lone surrogates,
    which the tokenizer would fail on later, far from the record)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {key!r} holds text that is not valid Unicode ({e.reason} at "
                        f"character {e.start}, e.g. an unpaired \\ud800-\\udfff escape)") from None
    return value


def record_id(rid: Any, key: str, where: str) -> str:
    """A question id: a non-empty string or an integer, as PubMedQA's PMIDs are."""
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        raise DataError(f"{where}: field {key!r} must be a non-empty string or an integer id, got {rid!r}")
    return require_text(str(rid), key, where)


def _unique_keys(where: str, error: type[ValueError] = DataError):
    """A json object hook that refuses repeated keys, which json.loads would silently keep
    only the last of."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"{where}: key {key!r} appears more than once in one object; keys (ids, fields) "
                            "must be unique")
            obj[key] = value
        return obj

    return hook


def parse_json(text: str, where: str, error: type[ValueError] = DataError) -> Any:
    """`json.loads` refusing repeated keys and saying where a file is not JSON or is nested
    deeper than the parser allows."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(where, error))
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to read (thousands of levels of [ or {{); not a PubMedQA file") from None


def read_text(path: Path) -> str:
    """A record file's text, or a `DataError` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def json_lines(text: str | Iterable[str], path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed object, where) for each non-blank line of a JSON Lines file's
    text, or of its lines as a file opened with `newline="\n"` gives them. Records end at
    "\n" only (splitlines would also cut at U+0085, U+2028...)."""
    for n, line in enumerate(text.split("\n") if isinstance(text, str) else text, start=1):
        if line.strip():
            where = f"{path}: line {n}"
            yield n, parse_json(line, where), where


def object_items(path: Path, chunk: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """The (key, value) pairs of a file that holds one JSON object, in file order, read a
    chunk at a time (a 450 MB `ori_pqaa.json` never sits in memory whole), as strict as
    `parse_json`: a repeated key, at the top or inside a value, or text that is not JSON is
    a `DataError` naming the line. A file whose top level is not an object raises
    `NotAnObject` before anything is yielded."""
    where, seen = str(path), set()
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys(where))
    try:
        stream = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    with stream:
        buf, pos, lines, eof = "", 0, 1, False  # lines: the line `buf` starts on

        def more(at_least: int = chunk) -> bool:
            nonlocal buf, pos, lines, eof
            lines += buf.count("\n", 0, pos)
            try:
                text = stream.read(max(at_least, chunk))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e})") from None
            buf, pos, eof = buf[pos:] + text, 0, not text
            return bool(text)

        def token() -> str:  # the next character that is not white space, read up to it
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\n\r":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos : pos + 1]

        def value() -> Any:
            nonlocal pos
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if eof or (end < len(buf) and buf[end] not in "0123456789.eE+-"):  # a number may go on
                        pos = end
                        return item
                except json.JSONDecodeError as e:
                    if eof:
                        line = lines + buf.count("\n", 0, e.pos)
                        raise DataError(f"{path}: not valid JSON ({e.msg} at line {line})") from None
                except RecursionError:
                    raise DataError(f"{path}: nested too deeply to read (thousands of levels of [ or {{); "
                                    "not a PubMedQA file") from None
                more(2 * (len(buf) - pos))  # a value cut by the chunk's end: read on

        first = token()
        if first != "{":
            raise NotAnObject(first)
        pos += 1
        if token() == "}":
            return
        while True:
            key = value()
            if not isinstance(key, str):
                raise DataError(f"{path}: not valid JSON (an object's key must be a string, at line {lines + buf.count(chr(10), 0, pos)})")
            if token() != ":":
                raise DataError(f"{path}: not valid JSON (expected ':' after key {key!r})")
            pos += 1
            token()
            item = value()
            if key in seen:
                raise DataError(f"{where}: key {key!r} appears more than once in one object; keys (ids, fields) must be unique")
            seen.add(key)
            yield key, item
            end = token()
            pos += 1
            if end == "}":
                if token():
                    raise DataError(f"{path}: not valid JSON (text after the top-level object)")
                return
            if end != ",":
                raise DataError(f"{path}: not valid JSON (expected ',' or '}}' after the value of {key!r})")
            token()


class NotAnObject(Exception):
    """`object_items`: the file's top level is not a JSON object; carries its first character."""
