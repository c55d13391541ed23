"""One magic per registered technique, generated from its config's declared options.

Nothing here knows a technique by name: the options (``nbcompress.options.option`` on the
config's fields) give the argparse arguments, the ``%verb?`` help, the parsing of each flag's text
(fractions like ``50%``, quotes, loader and model names) and the flag spelling of error messages.
"""
from __future__ import annotations

import argparse
import inspect

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core import StepConfig
from ..options import default_of, magic_spelling, options_of
from .base import NBMagics, step_options, user_errors


def option_help(f, opt) -> str:
    """The option's help with its default appended when the help does not say it."""
    text = opt.help
    d = default_of(f)
    if opt.kind != "bool" and d not in (None, (), []) and "default" not in text:
        shown = ",".join(f"{x:g}" for x in d) if isinstance(d, tuple) else \
            f"{d:g}" if isinstance(d, float) else d
        text += f" (default {shown})"
    return text


def arguments(cls: type[StepConfig]) -> list:
    """IPython ``@argument`` decorators for NAME and each declared option, in declaration order.
    Options left out of the line are absent from the parsed namespace (argparse.SUPPRESS): the
    config then keeps its field default, declared in one place."""
    out = [argument("name", help=cls.model_help)]
    for f, opt in options_of(cls):
        if not opt.magic:
            continue
        kw = dict(help=option_help(f, opt).replace("%", "%%"), default=argparse.SUPPRESS)
        if opt.positional:
            out.append(argument(f.name, nargs="?", metavar=opt.default_metavar(f.name), **kw))
            continue
        flags = opt.flags(f.name)
        if opt.kind == "bool":
            out.append(argument(*flags, dest=f.name, action="store_true", **kw))
        else:
            out.append(argument(*flags, dest=f.name, metavar=opt.default_metavar(f.name), **kw))
    return out


def magic_doc(cls: type[StepConfig]) -> str:
    doc = inspect.cleandoc(cls.__doc__ or cls.summary or cls.technique).split("\nOptions (")[0]
    if cls.examples:
        doc += "\n\nExamples::\n\n" + "\n".join("    " + e for e in cls.examples)
    return doc


def make_magic(cls: type[StepConfig]):
    """The line magic function of one technique (IPython decorators applied)."""
    name = cls.magic_name()

    def magic(self, line="", local_ns=None):
        args = parse_argstring(magic, line)
        return self.run_technique(cls, args, line, local_ns)

    magic.__name__ = magic.__qualname__ = name
    magic.__doc__ = magic_doc(cls)
    magic.spell = magic_spelling(cls)
    fn = step_options(magic)
    for deco in reversed(arguments(cls)):
        fn = deco(fn)
    fn = magic_arguments()(fn)
    fn = user_errors(fn)
    return line_magic(needs_local_scope(no_var_expand(fn)))


def technique_magics(cls: type[StepConfig]) -> type:
    """A Magics class holding the technique's one magic."""
    fn = make_magic(cls)
    body = {cls.magic_name(): fn, "__doc__": f"%{cls.magic_name()}: {cls.summary}"}
    return magics_class(type(f"{cls.__name__}Magics", (NBMagics,), body))


def usage(cls: type[StepConfig]) -> str:
    """``%prune NAME [AMOUNT] [options]``: the magic's shape, required options spelled out."""
    parts = [f"%{cls.magic_name()}", "NAME"]
    for f, opt in options_of(cls):
        if not opt.magic:
            continue
        if opt.positional:
            parts.append(f"[{opt.default_metavar(f.name)}]")
        elif opt.required:
            parts.append(f"{opt.flags(f.name)[-1]} {opt.default_metavar(f.name)}")
    return " ".join(parts + ["[options]"])


def magic_table() -> str:
    """The README's table of technique magics, from the registry (a test keeps them equal)."""
    import importlib

    from ..core import TECHNIQUES

    importlib.import_module("nbcompress.techniques")      # registers every technique
    rows = ["| magic | what it does | options |", "| --- | --- | --- |"]
    for cls in TECHNIQUES.values():
        flags = ["/".join(opt.flags(f.name))
                 for f, opt in options_of(cls) if opt.magic and not opt.positional]
        cell = " ".join(f"`{x}`" for x in flags)
        rows.append(f"| `{usage(cls)}` | {cls.summary} | {cell} |")
    return "\n".join(rows) + "\n"
