"""The errors a user sees. Every message is one clear line; the magics show it as a ``UsageError``
(no traceback) and the model is never changed."""
from __future__ import annotations

import re
from typing import Callable


class NBCompressError(Exception):
    """An ordinary exception: what strict mode raises from a magic, and the base of our errors."""


class BadInput(NBCompressError, ValueError):
    """A wrong argument or an unsupported model/layer. The message is one clear line meant for the
    user; the magics show it as a ``UsageError`` (no traceback), and the model is never changed."""


class EvaluatorError(BadInput):
    """The evaluator cannot be used: wrong signature, or it returned something that is not a
    number or a dict with an accuracy. (An exception raised *inside* a user's evaluator is theirs
    and keeps its own type and traceback.)"""


class ExampleInputError(BadInput):
    """The model cannot run on the example input (wrong shape or type for this model)."""


_PLACE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:=([^{}]*))?\}")


class FieldError(BadInput):
    """A bad-input message written once with field placeholders: ``{name}`` or ``{name=value}``.

    ``str(e)`` is the Python spelling (``epochs``, ``importance='bn'``); :meth:`spelled` renders it
    with another spelling (the magics: ``--epochs``, ``--importance bn``)."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(render(template, python_name))

    def spelled(self, spell: Callable[[str, str | None], str]) -> str:
        return render(self.template, spell)


def python_name(name: str, value: str | None) -> str:
    return name if value is None else f"{name}={value}"


def render(template: str, spell: Callable[[str, str | None], str]) -> str:
    return _PLACE.sub(lambda m: spell(m.group(1), m.group(2)), template)
