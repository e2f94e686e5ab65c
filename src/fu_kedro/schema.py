"""The parameter schemas' common parts: the base class, value types and one error message.

Each pipeline's block of ``conf/`` has a schema in ``pipelines/<name>/params.py`` (pydantic
models); the top level (``seed``, ``classes``, the data sources, ``prerequisites``) has its
own in :mod:`fu_kedro.params`, whose hook checks every block a run reads before the first
node. The schemas hold no values: every key that ``conf/base`` sets is required, so
``conf/base`` stays the one place a value is written. A key is optional only where conf may
leave it out (documented where it is declared), ``None`` only where conf may say ``null``.

How a node reads its block: ``cfg = <Block>.from_any(params)`` at its entry. ``params`` is
what Kedro passes (``params:<block>``, a dict) or an already validated object; ``cfg`` is the
typed, validated block. A node that hands its block on to code reading a dict, or records it
(lineage, metadata), passes the dict it was given (:func:`as_dict`), so records stay as they
were. (Converting every node signature to typed objects would break every call that passes a
dict; one line at the entry gives the same checks.)

A bad block raises :class:`ParameterError`, one message naming each bad key (dotted, e.g.
``evaluation.train.stepz``), its block, and what the block allows.
"""
from __future__ import annotations

import string
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, Tag, ValidationError


class ParameterError(ValueError):
    """Parameters a schema refuses: an unknown key, a wrong type, a value out of range."""


# --------------------------------------------------------------------------- value types
# Numbers are strict: ``true`` is not 1, ``"5"`` is not 5 (conf and ``--params`` give parsed values).
PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Float = Annotated[float, Strict()]  # an int is taken as a float
PosFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]  # [0, 1]
OpenFraction = Annotated[float, Strict(), Field(ge=0, lt=1)]  # [0, 1)
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"a [low, high] range needs low <= high, got {list(pair)}")
    return pair


def range_of(item: Any) -> Any:
    """A ``[low, high]`` pair of ``item`` values, ``low <= high``."""
    return Annotated[tuple[item, item], AfterValidator(_ordered)]


Range = range_of(Float)


def _no_is_no(value: Any) -> Any:
    """YAML reads an unquoted ``no`` (``--params ...mixed_precision=no``) as ``false``."""
    return "no" if value is False else value


def precision_literal(*choices: str):
    """``Literal[choices]`` that also takes YAML's ``false`` for ``no``."""
    return Annotated[typing.Literal[choices], BeforeValidator(_no_is_no)]


# cpu | cuda | cuda:N | mps, or auto (the process's device); fu_kedro.devices.resolve_device
Device = Annotated[str, Strict(), Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]


def _caption(template: str) -> str:
    """A caption template names the class word ``{plane}`` and nothing else (``str.format``)."""
    rule = "a caption template uses the placeholder {plane} (the class word) and no other"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # a lone { or }
        raise ValueError(f"{rule}: {exc}") from None
    wrong = [f for f in fields if f != "plane"]
    if wrong or not fields:
        raise ValueError(f"{rule}, got {', '.join('{' + f + '}' for f in wrong) if wrong else 'none'}")
    try:
        template.format(plane="x")
    except (ValueError, IndexError, KeyError, AttributeError) as exc:  # {plane!x}, {plane:%}, ...
        raise ValueError(f"{rule}: {exc}") from None
    return template


CaptionTemplate = Annotated[str, Strict(), AfterValidator(_caption)]


# --------------------------------------------------------------------------- the base class
class Block(BaseModel):
    """A block of parameters: unknown keys refused, no defaults (see the module docstring).

    ``BLOCK`` is the block's dotted name in ``conf/`` (``evaluation``); nested blocks inherit
    the name from where they sit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    BLOCK: ClassVar[str] = ""

    @classmethod
    def from_any(cls, value: Any):
        """``value`` (a dict from conf, or an instance) as a validated instance; else :class:`ParameterError`."""
        if isinstance(value, cls):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise ParameterError(explain(exc, cls, cls.BLOCK)) from None


def as_dict(value: Any) -> dict[str, Any]:
    """The dict a block was given as (an instance: its keys that were set)."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return dict(value or {})


# --------------------------------------------------------------------------- messages
def _strip(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` and without ``None`` in an ``Optional``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _names(member: Any) -> set[str]:
    """How pydantic names a union member in an error's ``loc``: its model's name, or its ``Tag``."""
    names = {_strip(member).__name__} if _is_model(_strip(member)) else set()
    if get_origin(member) is Annotated:
        names |= {m.tag for m in get_args(member)[1:] if isinstance(m, Tag)}
    return names


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """``loc`` without pydantic's union-member tags, and the model whose key its last part is."""
    clean: list = []
    current: Any = model
    owner = None
    for part in loc:
        base = _strip(current)
        if _is_model(base):
            owner = base
            clean.append(part)
            field = base.model_fields.get(str(part))
            current = field.annotation if field is not None else None
        elif get_origin(base) in (Union, types.UnionType):  # pydantic names the member it tried
            current = next((m for m in get_args(base) if part in _names(m)), None)
        elif get_origin(base) in (dict, Mapping):
            owner = None
            clean.append(part)
            current = get_args(base)[1]
        elif get_origin(base) in (list, tuple):
            owner = None
            clean.append(part)
            args = get_args(base)
            current = args[part] if get_origin(base) is tuple and isinstance(part, int) and part < len(args) else args[0]
        else:
            owner = None
            clean.append(part)
            current = None
    return tuple(clean), owner


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(err: dict) -> str:
    if err["type"] == "literal_error":
        return err["ctx"]["expected"]
    if err["type"] == "none_required":
        return "null"
    return err["msg"].removeprefix("Value error, ").removeprefix("Input should be ")


def explain(exc: ValidationError, model: type[BaseModel], prefix: str) -> str:
    """One message for every error of ``exc``: the dotted key, its block, what the block allows."""
    return message(problems(exc, model, prefix))


def message(lines: list[str]) -> str:
    """The one error message for ``lines`` (one problem each)."""
    head = "a bad parameter" if len(lines) == 1 else f"{len(lines)} bad parameters"
    return f"{head} (conf/ or --params), checked before any node runs:\n  " + "\n  ".join(lines)


def problems(exc: ValidationError, model: type[BaseModel], prefix: str) -> list[str]:
    """One line per bad key of ``exc`` (``model``'s errors; ``prefix``: the block's dotted name)."""
    groups: dict[tuple, list[tuple[dict, type[BaseModel] | None]]] = {}
    for err in exc.errors(include_url=False):
        loc, owner = _walk(model, err["loc"])
        groups.setdefault(loc, []).append((err, owner))
    lines = []
    for loc, errs in groups.items():
        parts = [prefix, *map(str, loc)] if prefix else list(map(str, loc))
        dotted = ".".join(parts) or "(the parameters)"
        block = ".".join(parts[:-1] if loc else parts)
        block = f"in {block}" if block else "at the top level"
        err, owner = errs[0]
        keys = ", ".join(owner.model_fields) if owner is not None else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key {block}; allowed keys: {keys}")
        elif not loc:  # a rule between keys of the block
            lines.append(f"{dotted}: {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "missing":
            lines.append(f"{dotted}: missing {block} (its keys: {keys})")
        elif len(errs) > 1:  # one error per member of a union
            expected = " or ".join(dict.fromkeys(_expected(e) for e, _ in errs))
            lines.append(f"{dotted}: {_short(err['input'])} {block}; allowed: {expected}")
        elif err["type"] == "literal_error":
            lines.append(f"{dotted}: {_short(err['input'])} {block}; allowed values: {_expected(err)}")
        else:
            lines.append(f"{dotted}: {_short(err['input'])} {block}: {err['msg'].removeprefix('Value error, ')}")
    return lines
