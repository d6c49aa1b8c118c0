"""Reading record files that may be hostile: one error type that says which file, which
record and which field and what was expected; JSON that refuses repeated keys and runaway
nesting; the field checks every task's reader shares."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
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


def json_lines(text: str, path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed object, where) for each non-blank line of a JSON Lines file.
    Records end at "\n" only (splitlines would also cut at U+0085, U+2028...)."""
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            where = f"{path}: line {n}"
            yield n, parse_json(line, where), where
