"""Command-line flags generated from pydantic config models.

One flag per field: its name is the field's (``--prefix-`` + underscores as dashes), its help is the
field's description, its default the field's, its type read from the annotation (int, float, str;
a ``Literal`` gives choices; a bool gives ``--x/--no-x``; a field marked
``json_schema_extra={"repeatable": True}`` is a string flag given once or more, its values collected
in a list; a nested object, mapping or tuple is given as JSON). A new config field therefore gets its flag without touching the CLI.

Flags left out of the command line stay out of the built model (their argparse default is
``None``), so the model's own defaults apply and nothing is copied here. Building validates the
model; its errors are reported naming the flag (``--ulysses-degree: Input should be ...``).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

NONE = "none"  # the value that picks None for an optional choice (e.g. --cache-backend none)


@dataclass(frozen=True)
class FlagSet:
    """The flags of some fields of one pydantic model.

    Attributes:
        model: the config class.
        prefix: flag prefix (``"dit"`` -> ``--dit-min-replicas``); ``""`` for none.
        fields: the fields that get a flag (default: every field).
        exclude: fields that get none.
        label: prepended to each help text and error (``"DiT: "``).
        base: the instance whose values are the defaults (shown in the help, and the fields it set
            are kept when building), e.g. a field's ``default_factory`` product; ``None``: the
            model's own defaults.
    """

    model: type[BaseModel]
    prefix: str = ""
    fields: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    label: str = ""
    base: BaseModel | None = None

    def names(self) -> list[str]:
        chosen = self.model.model_fields if self.fields is None else self.fields
        return [n for n in chosen if n in self.model.model_fields and n not in self.exclude]

    def flag(self, name: str) -> str:
        return "--" + (f"{self.prefix}_{name}" if self.prefix else name).replace("_", "-")

    def dest(self, name: str) -> str:
        return f"{self.prefix}_{name}" if self.prefix else name

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        for name in self.names():
            info = self.model.model_fields[name]
            default = info.get_default(call_default_factory=True) if self.base is None else getattr(self.base, name)
            parser.add_argument(self.flag(name), dest=self.dest(name), default=None, required=info.is_required(),
                                help=_help(self.label, info.description, default), **_kind(info))

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The fields given on the command line, by field name (JSON flags parsed).

        Raises:
            ValueError: a JSON flag that is not valid JSON, naming the flag.
        """
        out: dict[str, Any] = {}
        for name in self.names():
            value = getattr(args, self.dest(name), None)
            if value is None:
                continue
            info = self.model.model_fields[name]
            if _is_json(info):
                value = _json(self.flag(name), value, info)
            elif value == NONE and _optional(info.annotation) and NONE not in _choices(info.annotation):
                value = None
            out[name] = value
        return out

    def build(self, args: argparse.Namespace, **extra: Any) -> BaseModel:
        """The model from ``base``'s set fields, its flags and ``extra`` fields, validated; errors
        name the flag."""
        return self.validate({**self.values(args), **extra})

    def validate(self, values: Mapping[str, Any]) -> BaseModel:
        base = {} if self.base is None else self.base.model_dump(exclude_unset=True)
        try:
            return self.model.model_validate({**base, **values})
        except ValidationError as exc:
            raise ValueError(self.message(exc)) from None

    def message(self, exc: ValidationError) -> str:
        """A validation error of this model in one line, naming the flags of the fields at fault."""
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            msg = err["msg"].removeprefix("Value error, ")
            if loc and loc[0] in self.names():
                parts.append(self.flag(loc[0]) + "".join(f".{p}" for p in loc[1:]) + f": {msg}")
            elif loc:
                parts.append(f"{self.label}{'.'.join(loc)}: {msg}")
            else:
                parts.append(f"{self.label}{msg}")
        return "; ".join(parts)


# ---- reading a field's annotation ------------------------------------------------------------------


def _optional(annotation: Any) -> bool:
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _bare(annotation: Any) -> Any:
    """The annotation without ``| None`` (a union of several other types stays a union)."""
    if _is_union(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return annotation


def _choices(annotation: Any) -> tuple[Any, ...]:
    bare = _bare(annotation)
    return typing.get_args(bare) if typing.get_origin(bare) is Literal else ()


def _repeatable(info: FieldInfo) -> bool:
    return isinstance(info.json_schema_extra, dict) and bool(info.json_schema_extra.get("repeatable"))


def _is_json(info: FieldInfo) -> bool:
    bare = _bare(info.annotation)
    return not (bare in (int, float, str, bool) or _choices(info.annotation) or _repeatable(info))


def _kind(info: FieldInfo) -> dict[str, Any]:
    bare = _bare(info.annotation)
    choices = _choices(info.annotation)
    if _repeatable(info):
        return {"action": "append", "metavar": "VALUE"}
    if choices:
        values = [*choices, NONE] if _optional(info.annotation) and NONE not in choices else list(choices)
        return {"choices": values, "type": type(choices[0])}
    if bare is bool:
        return {"action": argparse.BooleanOptionalAction}
    if bare in (int, float):
        return {"type": bare, "metavar": bare.__name__.upper()}
    if bare is str:
        return {"type": str}
    return {"metavar": "JSON"}


def _help(label: str, description: str | None, default: Any) -> str:
    text = label + (description or "")
    if default is not PydanticUndefined and default is not None and not isinstance(default, BaseModel):
        shown = json.dumps(default) if isinstance(default, dict | list | tuple) else default
        if shown not in ({}, "{}", "[]"):
            text += f" (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def _json(flag: str, text: str, info: FieldInfo) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None
    bare = _bare(info.annotation)
    wants_object = (isinstance(bare, type) and issubclass(bare, BaseModel)) or typing.get_origin(bare) in (
        dict, Mapping) or bare is dict or _is_union(bare)
    if wants_object and not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"name\": value}}'")
    return value
