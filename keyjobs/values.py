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
  together, and for a result: every claim reads them.

Error text and tracebacks are not refused but made storable (``storable_text``):
a failure can always be recorded.
"""

import math
import re
import sys
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


def check_arguments(arguments: dict[str, Any], *, where: str) -> None:
    """Raise ArgumentError unless every argument (by parameter name) can be stored; nothing else is done."""
    walk = _Walk(where, "argument", ArgumentError)
    for name, value in arguments.items():
        walk.value(value, name, 0)
    walk.check_size("the arguments together take")


def check_result(value: Any, *, where: str) -> None:
    """Raise ResultNotStorable unless a task's return value can be stored."""
    walk = _Walk(where, "result", ResultNotStorable)
    walk.value(value, "return value", 0)
    walk.check_size("the result takes")


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
                "(KEYJOBS_MAX_VALUE_BYTES); store large data elsewhere (a file, a table) and pass its id"
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
