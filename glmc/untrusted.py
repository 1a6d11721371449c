"""Reading text a user hands glmc (spec files, `config.json`) and echoing it back in messages.

Spec and config files are small, so every limit here is far above what a real one needs and
far below what would make glmc hang or exhaust memory:

- a file is read only when it is a regular file of at most `MAX_FILE_BYTES`;
- JSON and YAML are parsed strictly: a duplicate key is refused (both parsers would keep the
  last value silently), as are JSON's `NaN`/`Infinity` extensions;
- YAML aliases are counted as what they expand to, before anything is built, so an alias bomb
  (a few lines that expand to billions of nodes) is refused instead of hanging whoever walks
  the result; nesting deeper than `MAX_DEPTH` is refused before the (recursive) composer runs;
- every parse error is one short line naming the file and, for YAML, the line and column.

`clip` and `one_line` make any text safe to print in a one-line message: control characters
(terminal escape sequences) become visible escapes, and long values are cut.
"""

from __future__ import annotations

import json
import re
import stat
import unicodedata
from pathlib import Path
from typing import Any, NoReturn

import yaml

from glmc.errors import SpecError

MAX_FILE_BYTES = 4 * 2**20
MAX_DEPTH = 32
MAX_NODES = 100_000
MESSAGE_CHARS = 400

_UNPRINTABLE = ("Cc", "Cf", "Cs", "Zl", "Zp")  # controls, bidi/zero-width formats, line separators


def has_control_chars(text: str) -> bool:
    return any(unicodedata.category(c) in _UNPRINTABLE for c in text)


def printable(text: str) -> str:
    """`text` with control and format characters shown as escapes (`\\x1b`, `\\u202e`)."""
    if not has_control_chars(text):
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _UNPRINTABLE else c
        for c in text
    )


def clip(value: object, limit: int = 60) -> str:
    """A short printable rendering of a user-given value for an error message."""
    text = printable(value if isinstance(value, str) else _short_repr(value))
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}... ({len(text)} chars)"


def describe(value: object) -> str:
    """A user-given value and its JSON type, short: `'64' (a string)`, `true (a boolean)`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{clip(repr(value))} (a string)"
    if isinstance(value, int | float):
        return f"{clip(value)} ({'an integer' if isinstance(value, int) else 'a number'})"
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _short_repr(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        # str() of an integer over 4300 digits raises; its size is what the reader needs anyway
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, bool | int | float | type(None)):
        return repr(value)
    return f"<{type(value).__name__}>"


def one_line(message: str, limit: int = MESSAGE_CHARS) -> str:
    """`message` on one line (newlines and runs of blanks folded), printable, at most `limit` chars."""
    text = printable(re.sub(r"[ \t]+", " ", re.sub(r"\s*\n\s*", "; ", message.strip())))
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text) - limit + 30} more chars)"


# ---- files ------------------------------------------------------------------------------------


def read_text(path: Path, what: str = "spec file") -> str:
    """The UTF-8 text of regular file `path` (at most MAX_FILE_BYTES); SpecError otherwise."""
    try:
        st = path.stat()
    except OSError:
        raise SpecError(f"{what} not found: {clip(str(path), 200)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{clip(str(path), 200)}: {what} is not a regular file")
    too_big = SpecError(
        f"{clip(str(path), 200)}: {what} is over {MAX_FILE_BYTES:,} bytes, the most glmc reads "
        "for a spec or config file"
    )
    if st.st_size > MAX_FILE_BYTES:
        raise too_big
    try:
        with path.open("rb") as f:  # bounded even where st_size says 0 (/proc files)
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{clip(str(path), 200)}: cannot read {what}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise too_big
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{clip(str(path), 200)}: not UTF-8 text (byte {e.start})") from None


def load_json(text: str, where: str) -> Any:
    """Strict JSON: duplicate keys and NaN/Infinity refused, nesting bounded."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise _RefusedError(f"duplicate key {clip(k)}")
            out[k] = v
        return out

    def constant(name: str) -> NoReturn:
        raise _RefusedError(f"{name} is not a JSON number; give a finite value")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except _RefusedError as e:
        raise SpecError(f"{where}: {e}") from None
    except RecursionError:
        raise SpecError(f"{where}: JSON nested too deeply (glmc reads at most {MAX_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: cannot parse JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{where}: cannot parse JSON: {one_line(str(e), 160)}") from None
    check_tree(data, where)
    return data


def load_yaml(text: str, where: str) -> Any:
    """Strict YAML (safe types only): duplicate keys refused, aliases counted as their
    expansion, nesting bounded; all checked on the event stream before the tree is built."""
    try:
        _check_events(text, where)
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe types only
    except _RefusedError as e:
        raise SpecError(f"{where}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise SpecError(f"{where}: cannot parse YAML{at}: {one_line(what, 160)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise SpecError(f"{where}: cannot parse YAML: {one_line(str(e) or type(e).__name__, 160)}") from None


def check_tree(data: Any, where: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Refuse nesting deeper than `max_depth` or more than `max_nodes` containers and scalars
    (shared sub-objects counted each time they appear, as a serialiser would write them).
    Iterative and stops at the first limit, so a cyclic or exponentially shared dict is cheap."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    nodes = 0
    while stack:
        x, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise SpecError(f"{where}: more than {max_nodes:,} values; spec and config files are far smaller")
        if isinstance(x, dict | list | tuple):
            if depth > max_depth:
                raise SpecError(f"{where}: nested deeper than {max_depth} levels")
            items = x.values() if isinstance(x, dict) else x
            stack.extend((v, depth + 1) for v in items)


class _RefusedError(Exception):
    pass


def _check_events(text: str, where: str) -> None:
    events = yaml.events
    anchors: dict[str, int] = {}
    open_: list[list[Any]] = []  # [anchor, expanded size] of each open collection
    total = 0

    def add(n: int) -> None:
        nonlocal total
        total += n
        if total > MAX_NODES:
            raise _RefusedError(
                f"expands to more than {MAX_NODES:,} values (YAML aliases are counted as what they repeat)"
            )
        if open_:
            open_[-1][1] += n

    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, events.ScalarEvent):
            add(1)
            if ev.anchor:
                anchors[ev.anchor] = 1
        elif isinstance(ev, events.AliasEvent):
            add(anchors.get(ev.anchor or "", 1))  # an undefined alias is the composer's error to report
        elif isinstance(ev, events.SequenceStartEvent | events.MappingStartEvent):
            if len(open_) >= MAX_DEPTH:
                raise _RefusedError(f"nested deeper than {MAX_DEPTH} levels")
            add(1)
            open_.append([ev.anchor, 1])
        elif isinstance(ev, events.SequenceEndEvent | events.MappingEndEvent):
            anchor, size = open_.pop()
            if anchor:
                anchors[anchor] = size
            if open_:  # add() already counted these nodes in `total`; only the parent's size grows
                open_[-1][1] += size - 1


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping (explicit keys; `<<` merges keep
    YAML's override rule)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise _RefusedError(f"duplicate key {clip(key)} at line {key_node.start_mark.line + 1}")
        return super().construct_mapping(node, deep=deep)
