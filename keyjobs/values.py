"""What keyjobs can store: the one rule for arguments and results, on every database.

A value is stored as JSON, and read back as the same value: plain data
(``str``, ``int``, ``float``, ``bool``, ``None``, lists and tuples, dicts with
string keys) that both databases accept. The rule is PostgreSQL's, applied on
SQLite too, so that a project developed on SQLite meets no surprise in
production:

- no NUL character in any string, dict keys included (jsonb refuses ``\\u0000``,
  and text columns cannot hold it);
- no surrogate code point (U+D800 to U+DFFF): it is not Unicode text, cannot be
  encoded as UTF-8, and jsonb refuses it or reads a pair of them back as one
  other character;
- finite floats only (JSON has no NaN or infinity);
- integers of at most ``MAX_INT_DIGITS`` digits (Python refuses to write or
  read a longer one as text, so it could not come back);
- at most ``MAX_DEPTH`` levels of nesting (deeper, JSON libraries run out of
  stack; this also stops a value that contains itself);
- at most ``KEYJOBS_MAX_VALUE_BYTES`` bytes of JSON for a call's arguments
  together, and for a result (the hard limit: a worker holds them in memory).

Where a value is kept: in the invocation's row while the arguments together,
or the result, take at most ``KEYJOBS_INLINE_VALUE_BYTES`` of JSON; past it,
the largest arguments (as many as it takes for the rest to fit), or the result,
go to a ``Value`` row of their own, stored once by the digest of their JSON
(``outline_arguments``, ``outline_result``). The row keeps the key arguments
always: the partial unique indexes compare keys, so the key arguments may take
at most ``KEYJOBS_INLINE_VALUE_BYTES`` together. Measuring a call's size is
part of the checks above, so a small call pays nothing more.

Error text and tracebacks are not refused but made storable (``storable_text``):
a failure can always be recorded.
"""

import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .conf import conf
from .exceptions import ArgumentError, KeyjobsError, ResultNotStorable, dotted_path

#: Python's default limit on the digits of an int converted to or from text (json.dumps and json.loads apply it).
MAX_INT_DIGITS: int = sys.int_info.default_max_str_digits
#: Containers inside containers: well below where json and the database drivers run out of stack (about 1,000
#: levels on Python 3.11).
MAX_DEPTH = 200
#: Characters of error text or traceback kept: the head and the tail of anything longer.
MAX_TEXT = 64 * 1024

_INT_LIMIT = 10**MAX_INT_DIGITS
_SURROGATE = re.compile("[\ud800-\udfff]")
_ATOMS = {type(None): 4, bool: 5}


def check_arguments(arguments: dict[str, Any], *, where: str, memo: "Memo | None" = None) -> int:
    """Raise ArgumentError unless every argument (by parameter name) can be stored; return their size as JSON.

    With a ``memo`` (one batch of calls), an argument object already measured
    in the batch is not walked again.
    """
    walk = _Walk(where, "argument", ArgumentError)
    for name, value in arguments.items():
        if memo is None or type(value) not in _CONTAINERS:
            walk.value(value, name, 0)
            continue
        known = memo.sizes.get(id(value))
        if known is not None:
            walk.size += known[1]
            continue
        before = walk.size
        walk.value(value, name, 0)
        memo.sizes[id(value)] = (value, walk.size - before)
    walk.check_size("the arguments together take")
    return walk.size


def check_result(value: Any, *, where: str) -> int:
    """Raise ResultNotStorable unless a task's return value can be stored; return its size as JSON."""
    walk = _Walk(where, "result", ResultNotStorable)
    walk.value(value, "return value", 0)
    walk.check_size("the result takes")
    return walk.size


def check(value: Any, *, where: str, path: str, kind: str = "argument") -> None:
    """Raise ArgumentError unless ``value`` alone can be stored; ``path`` names it in the message."""
    walk = _Walk(where, kind, ArgumentError)
    walk.value(value, path, 0)
    walk.check_size(f"{kind} {path!r} takes")


def storable_text(text: str, *, limit: int = MAX_TEXT) -> str:
    """Return ``text`` made storable: NULs shown as ``\\x00``, surrogates as U+FFFD, the middle cut past ``limit``."""
    if not (text.isascii() and "\x00" not in text):
        text = _SURROGATE.sub("\ufffd", text.replace("\x00", "\\x00"))
    if len(text) > limit:
        # Both ends matter: an error's message starts it, a traceback's cause ends it.
        marker = ""
        for _ in range(3):  # the marker's length depends on the count it shows: settle it
            marker = f"\n[... {len(text) - max(0, limit - len(marker)):,} characters cut by keyjobs ...]\n"
        kept = max(0, limit - len(marker))
        head = kept // 2
        text = text[:head] + marker + text[len(text) - (kept - head):]
    return text


#: Characters of a large value's JSON that its invocation's row keeps, for the monitor.
HEAD = 120

_CONTAINERS = frozenset({list, dict, tuple})


@dataclass(frozen=True)
class Stored:
    """A value kept out of its invocation's row: its JSON text and the digest that names it."""

    digest: str
    data: str
    size: int


@dataclass(frozen=True)
class Outlined:
    """A call's arguments with the large ones moved out: what its invocation's row keeps, and the value."""

    args: list[Any]
    kwargs: dict[str, Any]
    #: ``{"args": {"<index>": {"bytes": n, "head": "..."}}, "kwargs": {"<name>": {...}}}``: the places moved.
    outline: dict[str, dict[str, dict[str, Any]]]
    value: Stored


class Memo:
    """What one batch of calls (``delay_many()``) learned of its argument objects, so that each is read once.

    By identity: a batch's calls are built before anything else runs, so an
    object cannot change between two of them.
    """

    def __init__(self) -> None:
        self.sizes: dict[int, tuple[Any, int]] = {}
        self.texts: dict[int, tuple[Any, str, bytes]] = {}
        self.values: dict[tuple[tuple[str, str, int], ...], Stored] = {}


def stored(data: str) -> Stored:
    """Return the value whose JSON text is ``data``, named by its digest."""
    encoded = data.encode()
    return Stored(hashlib.sha256(encoded).hexdigest(), data, len(encoded))


def to_json(value: Any) -> str:
    """Return ``value``'s JSON text as keyjobs stores it out of line (compact, keys in their order)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def outline_arguments(
    args: "list[Any] | tuple[Any, ...]", kwargs: dict[str, Any], *, keys: Mapping[tuple[str, str], str], where: str,
    memo: Memo | None = None,
) -> Outlined | None:
    """Move a large call's largest arguments out of line until the rest fit ``KEYJOBS_INLINE_VALUE_BYTES``.

    ``keys`` are the places (``("args", "0")``, ``("kwargs", "name")``) of
    the key arguments, with their parameters' names: they stay, and
    ArgumentError names the largest if together they take more than the
    limit. Return None if nothing moves.
    """
    limit = conf.INLINE_VALUE_BYTES
    places = [("args", str(index), value) for index, value in enumerate(args)]
    places += [("kwargs", name, value) for name, value in kwargs.items()]
    texts = {(part, at): _text(value, memo) for part, at, value in places}
    sizes = {place: len(encoded) for place, (_, encoded) in texts.items()}
    kept = [(sizes[part, at], keys[part, at]) for part, at, _ in places if (part, at) in keys]
    if sum(size for size, _ in kept) > limit:
        size, name = max(kept)
        raise ArgumentError(
            f"{where}: the key arguments take {sum(size for size, _ in kept):,} bytes as JSON together, over "
            f"KEYJOBS_INLINE_VALUE_BYTES ({limit:,}), the most a key may take: keys stay in the invocation's row, "
            f"where the database compares them; the largest is argument {name!r} ({size:,} bytes)"
        )
    rest = sum(sizes.values())
    moved: set[tuple[str, str]] = set()
    for size, part, at in sorted(((sizes[part, at], part, at) for part, at, _ in places
                                  if (part, at) not in keys), key=lambda one: -one[0]):
        if rest <= limit:
            break
        moved.add((part, at))
        rest -= size
    if not moved:
        return None
    chosen = [(part, at, value) for part, at, value in places if (part, at) in moved]
    identity = tuple((part, at, id(value)) for part, at, value in chosen)
    value = memo.values.get(identity) if memo is not None else None
    if value is None:
        data = "{" + ",".join(
            f'"{part}":{{' + ",".join(f"{to_json(at)}:{texts[part, at][0]}" for p, at, _ in chosen if p == part) + "}"
            for part in ("args", "kwargs")) + "}"
        value = stored(data)
        if memo is not None:
            memo.values[identity] = value
    outline: dict[str, dict[str, dict[str, Any]]] = {"args": {}, "kwargs": {}}
    for part, at, _ in chosen:
        outline[part][at] = {"bytes": sizes[part, at], "head": texts[part, at][0][:HEAD]}
    return Outlined(
        [None if ("args", str(index)) in moved else item for index, item in enumerate(args)],
        {name: None if ("kwargs", name) in moved else item for name, item in kwargs.items()},
        outline, value,
    )


def _text(value: Any, memo: Memo | None) -> tuple[str, bytes]:
    """Return ``value``'s JSON text and its UTF-8, read once a batch."""
    if memo is None or type(value) not in _CONTAINERS:
        text = to_json(value)
        return text, text.encode()
    known = memo.texts.get(id(value))
    if known is None:
        text = to_json(value)
        known = memo.texts[id(value)] = (value, text, text.encode())
    return known[1], known[2]


def restore_arguments(args: list[Any], kwargs: dict[str, Any], data: str) -> tuple[list[Any], dict[str, Any]]:
    """Return a call's arguments with the places its out-of-line value (JSON ``data``) holds put back."""
    moved = json.loads(data)
    args = list(args)
    for index, value in moved["args"].items():
        args[int(index)] = value
    return args, {**kwargs, **moved["kwargs"]}


def outline_result(value: Any, size: int) -> Stored | None:
    """Return the out-of-line value of a result whose JSON takes ``size`` bytes, or None if it stays in the row."""
    if size <= conf.INLINE_VALUE_BYTES:
        return None
    return stored(to_json(value))


class _Walk:
    """One pass over a value: the checks, and the size of its JSON in UTF-8 (escapes counted as one byte)."""

    def __init__(self, where: str, kind: str, error: type[KeyjobsError]) -> None:
        self.where = where
        self.kind = kind
        self.error = error
        self.size = 0
        # Stop walking once past the limit: a value that shares its parts can be far larger than it looks.
        self.limit = conf.MAX_VALUE_BYTES

    def refuse(self, path: str, problem: str) -> KeyjobsError:
        if len(path) > 200:  # deep in a deep value: its ends say where
            path = f"{path[:120]}...{path[-60:]}"
        return self.error(f"{self.where}: {self.kind} {path!r} {problem}")

    def check_size(self, what: str) -> None:
        if self.size > self.limit:
            raise self.error(
                f"{self.where}: {what} over {self.limit:,} bytes as JSON, past the limit "
                "(KEYJOBS_MAX_VALUE_BYTES); store larger data elsewhere (a file, a table) and pass its id"
            )

    def value(self, value: Any, path: str, depth: int) -> None:
        kind = type(value)
        if kind is str or isinstance(value, str):
            self.size += self.text(value, path, "is a string that") + 2
        elif kind in _ATOMS:
            self.size += _ATOMS[kind]
        elif isinstance(value, int):
            if value.bit_length() <= 64:
                self.size += len(str(value))
            elif abs(value) >= _INT_LIMIT:
                raise self.refuse(path, f"is an integer of more than {MAX_INT_DIGITS} digits, "
                                        "which cannot be written as JSON and read back")
            else:
                self.size += int(value.bit_length() * 0.302) + 2  # its digits, near enough
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise self.refuse(path, f"is {value!r}, which JSON cannot hold")
            self.size += len(repr(value))
        elif isinstance(value, (list, tuple)):
            self.deeper(path, depth)
            self.size += 1 + len(value)
            for index, item in enumerate(value):
                self.value(item, f"{path}[{index}]", depth + 1)
                if self.size > self.limit:
                    return
        elif isinstance(value, dict):
            self.deeper(path, depth)
            self.size += 1 + 2 * len(value)
            for key, item in value.items():
                if not isinstance(key, str):
                    raise self.refuse(path, f"has the key {key!r}; JSON object keys must be strings")
                self.size += self.text(key, path, f"has a key ({key!r}) that") + 2
                self.value(item, f"{path}[{key!r}]", depth + 1)
                if self.size > self.limit:
                    return
        else:
            raise self.refuse(
                path,
                f"is a {dotted_path(kind)}, which is not JSON-serializable; pass plain data "
                "(str, int, float, bool, None, list, dict), e.g. an id instead of a model instance",
            )

    def deeper(self, path: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise self.refuse(path, f"nests containers more than {MAX_DEPTH} levels deep (or contains itself)")

    def text(self, text: str, path: str, subject: str) -> int:
        """Check one string; return its length in UTF-8."""
        if "\x00" in text:
            raise self.refuse(path, f"{subject} contains a NUL character (at index {text.index(chr(0))}), "
                                    "which PostgreSQL cannot store in JSON; keyjobs refuses it on every database")
        if text.isascii():
            return len(text)
        surrogate = _SURROGATE.search(text)
        if surrogate is not None:
            raise self.refuse(path, f"{subject} contains the surrogate U+{ord(surrogate.group()):04X} (at index "
                                    f"{surrogate.start()}), which is not a character and cannot be encoded as UTF-8")
        return len(text.encode())
