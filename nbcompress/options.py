"""Options declared once, on a technique config's dataclass fields.

A technique declares each option with :func:`option` (type kind, default, help, range, choices,
``requires=`` / ``conflicts=``); from that one declaration come

- the magic's argparse options and its ``%verb?`` help (``magics/technique.py``),
- the parsing of the magic's text (``parse_text``: fractions like ``50%``, quotes, loader names),
- the Python verb's keyword check (``StepConfig.check_options``),
- the checks every technique would otherwise write by hand (``check_fields``: types, ranges,
  choices, options that only apply with another one, options that exclude each other).

Errors speak the caller's language: a :class:`FieldError` is written once as a template naming
fields (``"{epochs} only applies with {finetune}"``); ``str(e)`` spells the Python field names
(``epochs only applies with finetune``) and the magics spell flags (``--epochs only applies with
--finetune``). ``{importance='bn'}`` is ``importance='bn'`` in Python and ``--importance bn`` on
the magic line. This is the approach of typer / pydantic (the parser is derived from the typed
declaration); IPython's ``magic_arguments`` decorators are generated rather than written.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import MISSING, dataclass
from typing import Any, Callable

from .errors import FieldError, python_name

__all__ = ["option", "Opt", "FieldError", "options_of", "check_fields", "parse_text",
           "is_number", "is_int", "unquote", "unknown_option", "magic_spelling", "KINDS"]

# kind -> default metavar on the magic line
KINDS = {
    "bool": None, "int": "N", "float": "X", "fraction": "F", "fractions": "F[,F...]",
    "choice": None, "regex": "REGEX", "str": "TEXT", "loader": "LOADER", "models": "NAME[,NAME...]",
    "any": "OBJ",
}


def is_number(v: Any) -> bool:
    """A real number (not a bool): int, float, numpy scalar."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    """A whole number (not a bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def unquote(text: str) -> str:
    """IPython keeps the quotes around an argument (``--layers "fc[12]"``): drop one matching
    pair, so every option reads its text the same way."""
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


@dataclass(frozen=True)
class Range:
    lo: float | None
    hi: float | None
    lo_open: bool
    hi_open: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Range":
        m = re.fullmatch(r"\s*([\[(])\s*([^,]*?)\s*,\s*([^,]*?)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"bad range {text!r}: write it like '(0, 1]' or '[1, inf)'")
        lo = None if m.group(2) in ("", "-inf") else float(m.group(2))
        hi = None if m.group(3) in ("", "inf") else float(m.group(3))
        return cls(lo, hi, m.group(1) == "(", m.group(4) == ")", text.strip())

    def __contains__(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def words(self, integer: bool) -> str:
        """'a whole number >= 1', 'a number in (0, 1]'."""
        what = "a whole number" if integer else "a number"
        fmt = (lambda x: str(int(x))) if integer else (lambda x: f"{x:g}")
        if self.hi is None and self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {fmt(self.lo)}"
        if self.lo is None and self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {fmt(self.hi)}"
        return f"{what} in {self.text}"


@dataclass(frozen=True)
class Opt:
    """One option's declaration (kept in the dataclass field's metadata)."""

    kind: str = "any"
    help: str = ""
    flag: str | None = None          # default: --field-name
    short: str | None = None         # e.g. -T
    metavar: str | None = None
    choices: tuple | None = None
    range: Range | None = None
    requires: str | None = None      # a field that must be given for this one to apply
    conflicts: tuple = ()            # fields that cannot be given together with this one
    positional: bool = False         # a positional argument of the magic (after NAME)
    magic: bool = True               # False: Python only (not on the magic line)
    flag_value: Any = True           # bool options: the value the flag sets
    optional: bool = True            # None is accepted
    accepts: tuple = ()              # further Python types accepted as they are (e.g. objects)
    check: Callable | None = None    # extra check: value -> message template or None
    required: bool = False           # the step cannot run without it ...
    unless: str | None = None        # ... unless this other field is given
    last: bool = False               # listed after the technique's own options (the options
                                     # every technique shares, declared on StepConfig)

    def flags(self, name: str) -> list[str]:
        """The option strings of field ``name`` on the magic line: ``["-T", "--temperature"]``,
        ``["--epochs"]`` (the long one is ``--field-name`` unless ``flag`` says otherwise)."""
        return [s for s in (self.short, self.flag or "--" + name.replace("_", "-")) if s]

    def default_metavar(self, name: str) -> str | None:
        if self.metavar:
            return self.metavar
        if self.kind == "choice" and self.choices:
            return "|".join(str(c) for c in self.choices)
        return name.upper() if self.positional else KINDS.get(self.kind)


def option(default: Any = MISSING, *, help: str, kind: str = "any",
           default_factory: Any = MISSING, range: str | None = None, kw_only: bool = False,
           **kw) -> Any:
    """A dataclass field that is also a declared option (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == "fraction" and range is None:
        range = "(0, 1)"
    if "choices" in kw and kw["choices"] is not None:
        kw["choices"] = tuple(kw["choices"])
    if isinstance(kw.get("conflicts"), str):
        kw["conflicts"] = (kw["conflicts"],)
    opt = Opt(kind=kind, help=help, range=Range.parse(range) if range else None, **kw)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"option": opt},
                                 kw_only=kw_only)
    return dataclasses.field(default=default, metadata={"option": opt}, kw_only=kw_only)


def options_of(cls_or_obj) -> list[tuple[dataclasses.Field, Opt]]:
    """The declared options of a config class, in declaration order (the shared ones, marked
    ``last``, after the technique's own)."""
    opts = [(f, f.metadata["option"]) for f in dataclasses.fields(cls_or_obj)
            if "option" in f.metadata]
    return sorted(opts, key=lambda fo: fo[1].last)


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def is_given(cfg, f: dataclasses.Field) -> bool:
    """Whether the field differs from its default (an option the caller gave)."""
    v = getattr(cfg, f.name)
    d = default_of(f)
    try:
        return not (v is d or (type(v) is type(d) and v == d))
    except Exception:       # e.g. tensors: not comparable to a default
        return True


def magic_spelling(cls) -> Callable[[str, str | None], str]:
    """Field name -> how the magic line writes it (``--epochs``, ``AMOUNT``, ``-T``)."""
    names, flag_values = {}, {}
    for f, opt in options_of(cls):
        if not opt.magic:
            continue
        names[f.name] = (opt.default_metavar(f.name) if opt.positional
                         else opt.flags(f.name)[0])
        if opt.kind == "bool":
            flag_values[f.name] = str(opt.flag_value)

    def spell(name: str, value: str | None) -> str:
        if name not in names:
            return python_name(name, value)
        flag = names[name]
        if value is None or value.strip() == flag_values.get(name, "True"):
            return flag           # a bool option at the value its flag sets: the flag alone
        return f"{flag} {unquote(value.strip())}"

    return spell


# ------------------------------------------------------------------------------------ checks
def _value_error(f: dataclasses.Field, opt: Opt, v: Any) -> str | None:
    """A message template when ``v`` is not a value of this option's kind, else None."""
    if v is None and opt.optional:
        return None
    if opt.accepts and isinstance(v, opt.accepts):
        return None
    k, name = opt.kind, "{" + f.name + "}"
    got = f"got {v!r}" if isinstance(v, (str, numbers.Number, type(None))) else \
        f"got a {type(v).__name__}"
    if k == "bool":
        return None if isinstance(v, bool) else f"{name} must be True or False, {got}"
    if k in ("int", "float", "fraction"):
        ok = is_int(v) if k == "int" else is_number(v) and math.isfinite(v)
        if ok and (opt.range is None or v in opt.range):
            return None
        if k == "fraction":
            return f"{name} must be a fraction in {opt.range.text} (0.5 or 50%), {got}"
        if opt.range is not None:
            return f"{name} must be {opt.range.words(k == 'int')}, {got}"
        return f"{name} must be {'a whole number' if k == 'int' else 'a finite number'}, {got}"
    if k == "fractions":
        try:
            items = list(v)
        except TypeError:
            items = []
        if items and not isinstance(v, str) and all(
                is_number(a) and (opt.range is None or a in opt.range) for a in items):
            return None
        return f"{name} must be a list of fractions in {opt.range.text}, {got}"
    if k == "choice":
        if isinstance(v, str) and v.lower() in {str(c).lower() for c in opt.choices}:
            return None
        return f"{name} must be one of {', '.join(map(str, opt.choices))}, {got}"
    if k == "regex":
        if not isinstance(v, str):
            return f"{name} must be a regular expression (a string), {got}"
        try:
            re.compile(v)
        except re.error as e:
            return f"{name} {v!r} is not a valid regular expression: {e}"
        return None
    if k == "str":
        return None if isinstance(v, str) else f"{name} must be a string, {got}"
    if k == "loader":
        from torch.utils.data import DataLoader

        return None if isinstance(v, DataLoader) else f"{name} must be a DataLoader, got a {type(v).__name__}"
    if k == "models":
        from torch import nn

        items = [v] if isinstance(v, nn.Module) else v if isinstance(v, (list, tuple)) else None
        if items is not None and all(isinstance(t, nn.Module) for t in items):
            return None
        return f"{name} must be a torch.nn.Module or a list of them, got a {type(v).__name__}"
    return None


def unknown_option(given, names, fn: str) -> str | None:
    """The message for keyword options of the Python verb ``fn`` that are not among ``names``."""
    import difflib

    unknown = sorted(set(given) - set(names))
    if not unknown:
        return None
    close = difflib.get_close_matches(unknown[0], sorted(names), n=3)
    return (f"{fn}() got an unknown option {unknown[0]!r}"
            + (f"; did you mean {', '.join(close)}?" if close else
               f"; options: {', '.join(sorted(names))}"))


def check_fields(cfg) -> None:
    """The checks every declaration implies, in declaration order: the value's kind, range and
    choices, then ``requires`` and ``conflicts``. Raises :class:`FieldError`."""
    fields = options_of(cfg)
    by_name = {f.name: f for f, _ in fields}
    for f, opt in fields:
        v = getattr(cfg, f.name)
        if opt.required and (v is None or (isinstance(v, (list, tuple, str)) and not v)) and \
                not (opt.unless and is_given(cfg, by_name[opt.unless])):
            raise FieldError(f"{{{f.name}}} is needed: {opt.help}")
    for f, opt in fields:
        msg = _value_error(f, opt, getattr(cfg, f.name))
        if msg is None and opt.check is not None and getattr(cfg, f.name) is not None:
            msg = opt.check(getattr(cfg, f.name))
        if msg:
            raise FieldError(msg)
    for f, opt in fields:
        if not is_given(cfg, f):
            continue
        for other in opt.conflicts:
            if other in by_name and is_given(cfg, by_name[other]):
                raise FieldError(f"give {{{f.name}}} or {{{other}}}, not both")
    unused: dict[str, list[str]] = {}
    for f, opt in fields:
        if opt.requires and is_given(cfg, f) and not is_given(cfg, by_name[opt.requires]):
            unused.setdefault(opt.requires, []).append(f.name)
    for req, names in unused.items():
        those = " and ".join("{" + n + "}" for n in names)
        verb = "apply" if len(names) > 1 else "applies"
        raise FieldError(f"{those} only {verb} with {{{req}}}: give {{{req}}} too (or leave out "
                         f"{those})")


# ------------------------------------------------------------------------------------ parsing text
def split_names(text: str | None) -> list[str]:
    """``"a, b c"`` -> ``["a", "b", "c"]``: a list of names as a magic line writes it."""
    if not text:
        return []
    return [t for t in re.split(r"[,\s]+", unquote(str(text).strip())) if t]


def parse_fraction(text: str, name: str) -> float:
    t = unquote(str(text).strip())
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise FieldError(f"{{{name}}} must be a number between 0 and 1 (or a percentage like "
                         f"50%), got {text!r}") from None


def parse_text(name: str, opt: Opt, text: Any, lookup: Callable[[str, str, Opt], Any] | None = None):
    """The value of option ``name`` from the magic line's ``text`` (argparse gave strings)."""
    if opt.kind == "bool":
        return opt.flag_value if text is True else text
    t = unquote(str(text).strip())
    if opt.kind == "int":
        try:
            return int(t)
        except ValueError:
            raise FieldError(f"{{{name}}} must be a whole number, got {text!r}") from None
    if opt.kind == "float":
        try:
            return float(t)
        except ValueError:
            raise FieldError(f"{{{name}}} must be a number, got {text!r}") from None
    if opt.kind == "fraction":
        return parse_fraction(t, name)
    if opt.kind == "fractions":
        return tuple(parse_fraction(p, name) for p in split_names(t))
    if opt.kind == "choice":
        return t.lower() if all(str(c) == str(c).lower() for c in opt.choices) else t
    if opt.kind in ("loader", "models", "any") and lookup is not None:
        return lookup(name, t, opt)
    return t
