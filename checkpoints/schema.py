"""The shape of every record the project reads back from its own files (resume files, checkpoint sidecars),
checked on load: types, sizes and required keys, so that a damaged or forged file is one bounded line naming the
file and the field, never an AttributeError, a KeyError or a message millions of characters long.

Paths in records are portable (`portable_path` when written, `recorded_candidates` when read): a checkpoint
trained in one folder works from any other.

A schema is a `Rule` (what one value must be); `Rule.keys` describes the fields of an object, `Rule.each` the
items of a list or the values of an object. `check(value, rule, source)` raises CheckpointError at the first
value that breaks its rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .files import CheckpointError

# The longest path a record may hold (Linux's PATH_MAX) and the longest fingerprint (a sha256 in hex is 64).
MAX_PATH_CHARS = 4096
MAX_FINGERPRINT_CHARS = 128
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def brief(value: Any, limit: int = 40) -> str:
    """repr(value) cut to `limit` characters, for error messages about values read from files. Containers are
    cut before their repr is built, so a 5 MB string or a million-item list costs nothing to describe."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (list, tuple)) and len(value) > limit:
        value = list(value[:limit])
    elif isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What each accepted type is called in messages.
_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


@dataclass(frozen=True)
class Rule:
    """What one value must be: one of `kinds` (int excludes bool; float accepts int), with `min_len` to `max_len`
    characters or items, at least `low` when a number; an object's `keys` (name -> Rule; names not given are
    allowed and not checked; `optional` names may be absent); a list's items or an object's values `each`."""

    kinds: tuple[type, ...]
    max_len: Optional[int] = None
    low: Optional[float] = None
    keys: Optional[dict[str, "Rule"]] = None
    optional: frozenset[str] = field(default_factory=frozenset)
    each: Optional["Rule"] = None
    min_len: int = 0

    def what(self) -> str:
        names = [_kind_name(k) for k in self.kinds]
        if self.keys:
            names = [f"an object with {', '.join(self.keys)}" if k is dict else n for k, n in zip(self.kinds, names)]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _kind_name(kind: type) -> str:
    return _KIND_NAMES.get(kind, f"a {kind.__name__}")


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def problem(value: Any, rule: Rule, name: str = "", root: str = "the record") -> Optional[str]:
    """What is wrong with `value` (`name` is its place, e.g. "tokenizer.path"; "" is the whole record, called
    `root` in the message), or None when it keeps `rule`."""
    label = name or root
    if not any(_is(value, kind) for kind in rule.kinds):
        return f"{label} is {brief(value)} ({type(value).__name__}), not {rule.what()}"
    if isinstance(value, (str, list, tuple, dict, bytes)):
        if rule.max_len is not None and len(value) > rule.max_len:
            return f"{label} is {len(value):,} long (at most {rule.max_len:,} allowed)"
        if len(value) < rule.min_len:
            return f"{label} has length {len(value)} (at least {rule.min_len} needed)"
    if rule.low is not None and _is(value, float) and not value >= rule.low:
        return f"{label} is {brief(value)}, below {rule.low:g}"
    if isinstance(value, dict):
        for key, sub in (rule.keys or {}).items():
            if key not in value:
                if key in rule.optional:
                    continue
                return f"{_join(name, key)} is missing"
            found = problem(value[key], sub, _join(name, key), root)
            if found:
                return found
        items = value.items() if rule.each is not None else ()
    else:
        items = enumerate(value) if isinstance(value, (list, tuple)) and rule.each is not None else ()
    for key, item in items:
        place = _join(name, key) if isinstance(key, str) and key.isidentifier() else f"{label}[{brief(key)}]"
        found = problem(item, rule.each, place, root)
        if found:
            return found
    return None


def _join(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def check(value: Any, rule: Rule, source: str, root: str = "the record", name: str = "",
          error: type = CheckpointError) -> None:
    """Raise `error` ("<source>: <field> is ..., not ...") at the first value of `value` that breaks `rule`;
    `name` is the place of `value` in its file ("" for the whole file, called `root`)."""
    found = problem(value, rule, name, root)
    if found:
        raise error(f"{source}: {found}")


def obj(keys: dict[str, Rule], optional: tuple[str, ...] = (), nullable: bool = False, **kwargs: Any) -> Rule:
    """An object rule with these fields (`nullable`: or null)."""
    return Rule((dict, type(None)) if nullable else (dict,), keys=keys, optional=frozenset(optional), **kwargs)


def path_and_fingerprint(nullable: bool = True) -> Rule:
    """A record of a file the checkpoint goes with (its tokenizer, its vision encoder): {"path", "fingerprint"}."""
    return obj({"path": Rule((str,), max_len=MAX_PATH_CHARS, min_len=1),
                "fingerprint": Rule((str,), max_len=MAX_FINGERPRINT_CHARS, min_len=1)}, nullable=nullable)


def portable_path(path: str) -> str:
    """`path` as a record stores it: an absolute path as it is; a relative one (meant from the working directory)
    relative to the project root when it lies inside the project (`model/minimind_tokenizer`), else absolute, so
    that the record means the same place from any working directory."""
    if os.path.isabs(path):
        return str(path)
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(absolute)


def recorded_candidates(recorded: str, source: str) -> list[str]:
    """Where a path recorded by checkpoint `source` may be, most likely first, without duplicates: an absolute
    path itself; a relative one from the working directory, from the project root (portable_path's records, and
    the older records of runs started there) and from the checkpoint's folder. The caller decides among them by
    the fingerprint."""
    if os.path.isabs(recorded):
        return [recorded]
    found, seen = [], set()
    for candidate in (recorded, str(PROJECT_ROOT / recorded), os.path.join(os.path.dirname(str(source)), recorded)):
        key = os.path.realpath(candidate)
        if key not in seen:
            seen.add(key)
            found.append(candidate)
    return found
