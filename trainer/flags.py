"""Command-line flags declared once, on the fields of a dataclass: `flag(...)` puts a flag's help, choices, default
(a value, or a function of the stage for a per-stage default) and least allowed value into the field's metadata,
and `add_flags` generates the argparse flags from the fields, in field order, their kind taken from the field's
type (`bool`: a switch; `int`/`float`, optional or not: converted; anything else: a string).

Adding a flag is one change: a field with `flag(...)` on the dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterable, Optional, Union

def flag(default: Any = None, help: Union[str, Callable[[Any], str], None] = None, *,
         choices: Optional[Iterable[Any]] = None, metavar: Optional[str] = None, minimum: Optional[float] = None,
         aliases: tuple[str, ...] = (), default_doc: Optional[str] = None, doc: Optional[str] = None) -> Any:
    """A dataclass field that is also a command-line flag `--<field name>`.

    `default` and `help` may be functions of the stage (`Stage`) for the values that differ per stage; `minimum`
    is the least value `check_minimums` accepts (None is always accepted); `aliases` are further spellings of the
    flag; `default_doc` describes a default that depends on the machine and `doc` the meaning of a flag that
    `--help` leaves without one (v1's, kept as they were), both for the reference table only.
    """
    meta = {"flag": True, "default": default, "help": help, "choices": None if choices is None else list(choices),
            "metavar": metavar, "minimum": minimum, "aliases": tuple(aliases), "default_doc": default_doc, "doc": doc}
    return dataclasses.field(metadata=meta)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _value_type(cls: type, field: dataclasses.Field) -> Any:
    """The field's type with Optional removed (the command line converts to this)."""
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint


def flag_default(field: dataclasses.Field, stage: Any) -> Any:
    """The flag's default for this stage."""
    default = field.metadata["default"]
    return default(stage) if callable(default) else default


def flag_help(field: dataclasses.Field, stage: Any) -> Optional[str]:
    """The flag's help text for this stage."""
    text = field.metadata["help"]
    return text(stage) if callable(text) else text


def flag_is_switch(cls: type, field: dataclasses.Field) -> bool:
    return _value_type(cls, field) is bool


def add_flags(parser: argparse.ArgumentParser, cls: type, stage: Any, names: Optional[Iterable[str]] = None,
              defaults: Optional[dict[str, Any]] = None) -> None:
    """Add the flags of `cls` (those in `names` only, when given) with `stage`'s defaults; `defaults` overrides
    some of them (by field name)."""
    wanted = None if names is None else set(names)
    for field in flag_fields(cls):
        if wanted is not None and field.name not in wanted:
            continue
        meta = field.metadata
        default = (defaults or {}).get(field.name, flag_default(field, stage))
        spellings = [f"--{field.name}", *meta["aliases"]]
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": flag_help(field, stage)}
        value_type = _value_type(cls, field)
        if value_type is bool:
            kwargs["action"] = "store_true"
        else:
            if value_type in (int, float):
                kwargs["type"] = value_type
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(*spellings, **kwargs)


def check_minimums(cls: type, values: Any, error: Callable[[str], Exception]) -> None:
    """Raise `error(message)` for the first flag below its declared minimum (the message names the flag)."""
    for field in flag_fields(cls):
        minimum = field.metadata["minimum"]
        value = getattr(values, field.name)
        if minimum is not None and value is not None and value < minimum:
            raise error(f"--{field.name} must be at least {minimum} (got {value})")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _shown(value: Any) -> str:
    return "none" if value is None else f"`{value!r}`" if value == "" else f"`{value}`"


def _per_stage(values: dict[str, str]) -> str:
    """One text when every stage has it, else each stage's labelled."""
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "; ".join(f"{label}: {value}" for label, value in values.items())


def flags_markdown(cls: type, stages: dict[str, Any]) -> str:
    """The reference table of every flag of `cls`: its spellings, its default (per stage, labelled by the keys of
    `stages`, where they differ) and its help with its choices."""
    rows = ["| Flag | Default | Meaning |", "| --- | --- | --- |"]
    for field in flag_fields(cls):
        meta = field.metadata
        names = ", ".join(f"`{name}`" for name in (f"--{field.name}", *meta["aliases"]))
        if flag_is_switch(cls, field):
            default = "off"
        elif meta["default_doc"] is not None:
            default = meta["default_doc"]
        else:
            default = _per_stage({label: _shown(flag_default(field, stage)) for label, stage in stages.items()})
        meaning = _per_stage({label: flag_help(field, stage) or meta["doc"] or "" for label, stage in stages.items()})
        if meta["choices"] is not None:
            meaning = f"{meaning} (one of {', '.join(f'`{c}`' for c in meta['choices'])})".lstrip()
        rows.append(f"| {_cell(names)} | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"
