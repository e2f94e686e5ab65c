"""Reading blocks of ``conf/`` parameters into typed settings, strictly.

Every training loop (autoencoder, base denoiser, LoRA, classifiers, CAS) takes its knobs
from a parameter block. A misspelt key (``lora: {max_step: 5}``) would otherwise be
ignored silently and the loop would run with the default — so an unknown key stops the
run, naming the key, the block and the keys that block accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


class UnknownSettingError(ValueError):
    """A parameter block has a key its loop does not know (most likely a typo)."""


def check_keys(values: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise :class:`UnknownSettingError` if ``values`` has a key outside ``allowed``.

    ``where`` names the block in the message, e.g. ``"lora_training.lora"``.
    """
    allowed = sorted(set(allowed))
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise UnknownSettingError(
            f"{where}: unknown key(s) {unknown} — allowed keys are {allowed}. "
            "A misspelt key would silently fall back to its default, so the run stops here."
        )


def strict_dataclass(cls: type[T], values: dict[str, Any] | None, where: str, ignore: Iterable[str] = ()) -> T:
    """``cls(**values)`` after :func:`check_keys` against the dataclass's fields.

    ``ignore`` lists keys that belong to the block but are read elsewhere (for example the
    autoencoder's ``kl_weight``); they are accepted and not passed to ``cls``.
    """
    values = dict(values or {})
    ignore = set(ignore)
    fields = {f.name for f in dataclasses.fields(cls)}
    check_keys(values, fields | ignore, where)
    return cls(**{k: v for k, v in values.items() if k not in ignore})
