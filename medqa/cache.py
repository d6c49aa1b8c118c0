"""Tokenized examples kept on disk: a DataModule's splits are tokenized once for everything
they depend on (the `key`) and stored as Arrow files; later runs, resumes, evaluations and
the other processes of a DDP run memory-map them instead of tokenizing again.

A cache folder is `<cache_dir>/<digest of the key>/`: one Arrow file a split and a
`manifest.json` naming the key, each file's size and SHA-256, and what the build counted
(records, cut passages, labels). A folder is used only when its manifest names this key and
every file has its recorded size and digest, and its values fit (lengths within max_length,
token ids within the vocabulary, answer positions and labels in range); anything else is
built again, with a warning. One process builds while the others wait on a file lock; the
new folder appears whole (written aside, then renamed), never half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from medqa.folders import build_once
from medqa.tokens import Example

log = logging.getLogger(__name__)

VERSION = 1  # raise when tokenization changes what an example holds for the same key
MANIFEST = "manifest.json"
PROGRESS_FROM = 5000  # records of a split that get a progress bar while they are tokenized
SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("prompt_len", pa.int32()),
                    ("answer_pos", pa.int32()), ("label", pa.int32()), ("truncated", pa.bool_())])


class TokenizedSplit(Sequence[Example]):
    """A split's examples in flat arrays (memory-mapped from the cache): an `Example` is made
    only when asked for, so memory does not grow with the split."""

    def __init__(self, table: pa.Table) -> None:
        # The token lists stay in the file's record batches (views into the mapped file): one
        # array of them all would copy every token into the process.
        self.chunks = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in table.column("input_ids").chunks]
        self.starts = np.cumsum([0] + [len(offsets) - 1 for offsets, _ in self.chunks])
        self.ids: list[str] = table.column("id").to_pylist()
        self.prompt_len, self.answer_pos, self.label = (table.column(c).to_numpy() for c in ("prompt_len", "answer_pos", "label"))
        self.truncated = table.column("truncated").to_numpy(zero_copy_only=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int | slice) -> Example | list[Example]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        c = int(np.searchsorted(self.starts, i, "right")) - 1
        offsets, values = self.chunks[c]
        j = i - self.starts[c]
        ids = values[offsets[j] : offsets[j + 1]].tolist()
        return Example(self.ids[i], ids, int(self.prompt_len[i]), int(self.answer_pos[i]), int(self.label[i]),
                       bool(self.truncated[i]))

    def lengths(self) -> list[int]:
        return self._lengths().tolist()

    def _lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(offsets) for offsets, _ in self.chunks] or [np.zeros(0, np.int32)])


def digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f"{f.relative_to(path)}\0".encode())
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def source_digest(source: str, config: str | None, records: Callable[[], Sequence[Any]]) -> str:
    """A local file's (or folder's) bytes, else the `records` read from the hub or made."""
    path = Path(source).expanduser()
    if source != "synthetic" and (path.is_file() or path.is_dir()):
        return file_digest(path)
    return digest("\n".join(map(repr, records())) + f"\n{config}")


def examples_sha256(examples: Iterable[Example]) -> str:
    """The digest of every training example that checkpoints saved before the cache's key
    (computed for those only: it goes through every example)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.id}|{e.answer_pos}|{e.label}|".encode())
        h.update(array("q", e.input_ids).tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """What the tokenizer turns text into: its vocabulary and rules, special tokens and chat
    template (the same files in another folder give the same digest)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
             type(tokenizer).__name__]
    return digest(rules + json.dumps(extra, default=str))


def write_split(path: Path, examples: Iterable[Example], chunk: int = 4096) -> dict[str, Any]:
    """Write examples to an Arrow file, a chunk at a time; what was written (counts)."""
    counts = {"examples": 0, "cut": 0, "tokens": 0}
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for part in _chunks(examples, chunk):
            writer.write_batch(pa.record_batch([
                [e.id for e in part], [e.input_ids for e in part],
                [e.prompt_len for e in part],
                [e.answer_pos for e in part], [e.label for e in part], [e.truncated for e in part],
            ], schema=SCHEMA))
            counts["examples"] += len(part)
            counts["cut"] += sum(e.truncated for e in part)
            counts["tokens"] += sum(len(e.input_ids) for e in part)
    return counts


def _chunks(items: Iterable[Example], n: int) -> Iterator[list[Example]]:
    part: list[Example] = []
    for item in items:
        part.append(item)
        if len(part) == n:
            yield part
            part = []
    if part:
        yield part


def read_split(path: Path) -> TokenizedSplit:
    """A split's Arrow file, memory-mapped (nothing is copied into the process)."""
    with pa.memory_map(str(path), "r") as source:
        return TokenizedSplit(pa.ipc.open_file(source).read_all())


class ExampleCache:
    """The cache folder for one key (see the module's docstring).

    Args:
        root: The cache directory (`--data.cache_dir`).
        key: Everything the examples depend on, as JSON-able values.
    """

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        self.key = {"version": VERSION, **key}
        self.digest = digest(json.dumps(self.key, sort_keys=True))
        self.root, self.folder = root, root / self.digest[:24]

    def load(self, limits: dict[str, int], written: bool = False) -> tuple[dict[str, TokenizedSplit], dict[str, Any]] | None:
        """The splits and the build's counts, or None where the folder is missing, foreign or
        damaged (said, for the last two). Files this process has just `written` are checked by
        their digests alone: their values came from the tokenizer, and reading every token
        again would bring the whole file into the process's memory."""
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") != self.key:
                raise ValueError("its manifest names another key")
            splits = {}
            for name, entry in manifest["splits"].items():
                path = self.folder / f"{name}.arrow"
                if path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
                    raise ValueError(f"{path.name} is not the file the build wrote")
                splits[name] = read_split(path)
                if not written:
                    _check(splits[name], limits, path.name)
            return splits, manifest["splits"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as e:
            log.warning(f"The tokenized-example cache {self.folder} is damaged or foreign ({e}); building it again.")
            return None

    def write(self, make: Callable[[], dict[str, tuple[Iterable[Example], dict[str, Any]]]], aside: Path) -> None:
        """Write every split that `make` gives (examples, and counts to keep) and the manifest
        into `aside`, the folder that `medqa.folders.build_once` then moves into place."""
        entries = {}
        for name, (examples, counts) in make().items():
            path = aside / f"{name}.arrow"
            if (counts.get("records") or PROGRESS_FROM) >= PROGRESS_FROM:  # None: a stream, of unknown size
                from tqdm import tqdm

                tqdm.write(f"Tokenizing the {name} records into {self.folder} (once).", file=sys.stderr)
                examples = tqdm(examples, total=counts["records"], desc=f"Tokenizing {name}", unit=" records",
                                mininterval=2, smoothing=0.1)
            written = write_split(path, examples)
            entries[name] = {**counts, **written, "bytes": path.stat().st_size, "sha256": file_digest(path)}
        manifest = {"key": self.key, "splits": entries, "built": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid()}
        (aside / MANIFEST).write_text(json.dumps(manifest, indent=1))

    def get(self, make: Callable[[], dict[str, tuple[Iterable[Example], dict[str, Any]]]],
            limits: dict[str, int]) -> tuple[dict[str, TokenizedSplit], dict[str, Any], bool]:
        """(splits, counts, whether this process built them): the folder's, else built once
        (`medqa.folders.build_once`: of several processes one builds and the others then map
        its files)."""
        found = None

        def ready(_: Path) -> bool:
            nonlocal found
            found = self.load(limits)
            return found is not None

        built = build_once(self.folder, ready, lambda aside: self.write(make, aside), "tokenized examples")
        if built:
            found = self.load(limits, written=True)
            if found is None:
                raise RuntimeError(f"the tokenized-example cache {self.folder} did not read back as written")
        return *found, built


def _check(split: TokenizedSplit, limits: dict[str, int], name: str) -> None:
    """Refuse values that no build of this key writes (a file edited or from elsewhere)."""
    if int(split.starts[-1]) != len(split) or any(
            len(o) and (o[0] < 0 or (np.diff(o) < 0).any() or o[-1] > len(v)) for o, v in split.chunks):
        raise ValueError(f"{name}: offsets")
    lengths, bad = split._lengths(), []
    if len(lengths) and (lengths.min() < 1 or lengths.max() > limits["max_length"]):
        bad.append(f"lengths outside 1..{limits['max_length']}")
    used = [v[o[0] : o[-1]] for o, v in split.chunks if len(o) and o[-1] > o[0]]
    if any(u.min() < 0 or u.max() >= limits["vocab"] for u in used):
        bad.append("token ids outside the vocabulary")
    if len(split) and ((split.answer_pos >= lengths).any() or (split.prompt_len > split.answer_pos).any()
                       or (split.prompt_len < 1).any()):
        bad.append("answer positions")
    if len(split) and ((split.label < 0).any() or (split.label >= limits["labels"]).any()):
        bad.append("labels")
    if bad:
        raise ValueError(f"{name}: {', '.join(bad)}")
