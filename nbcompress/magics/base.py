"""What every nbcompress magic shares: name lookup and rebinding, error handling, strict mode,
the per-shell workspace of histories, and running one step as a transaction.

Magics stay thin: parse arguments (``IPython.core.magic_arguments``), look names up, call the API,
return the report (IPython displays it; ``r = %prune m 0.5`` keeps it).
"""
from __future__ import annotations

import difflib
import functools
import os
import re
import shlex
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics
from IPython.core.magic_arguments import argument
from torch import nn

from ..core import BadInput, FieldError, NBCompressError, StepConfig
from ..history import History
from ..workspace import Workspace
from ..metrics import check_evaluator, is_loader, parse_input_shape
from ..options import magic_spelling, options_of, parse_text, split_names

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def strict() -> bool:
    """``NBCOMPRESS_STRICT=1``: magic errors become ordinary exceptions, so notebook tests
    (``pytest --nbval-lax``, which ignores ``UsageError``) fail when a magic fails."""
    return os.environ.get("NBCOMPRESS_STRICT", "").lower() in ("1", "true", "yes", "on")


def user_errors(fn):
    """Show argument mistakes and unsupported input as one line: a plain ``UsageError`` (IPython
    prints no traceback for it; not a subclass, see ipython#14024), or in strict mode an
    ordinary :class:`NBCompressError`.

    Options are never abbreviated: argparse would run ``--structure`` as ``--structured``, a
    different step than the one typed. An unknown option is refused with the closest real ones."""
    parser = getattr(fn, "parser", None)
    if parser is not None:
        parser.allow_abbrev = False
        _split_errors_are_usage_errors(parser)

    @functools.wraps(fn)
    def wrapper(self, line="", local_ns=None):
        try:
            return fn(self, line, local_ns)
        except (BadInput, UsageError) as e:
            spell = getattr(fn, "spell", None)
            msg = e.spelled(spell) if spell is not None and isinstance(e, FieldError) else str(e)
            if parser is not None and isinstance(e, UsageError):
                msg = _suggest_options(msg, parser)
            if strict():
                raise NBCompressError(msg) from None
            raise UsageError(msg) from None

    return wrapper


def _split_errors_are_usage_errors(parser) -> None:
    """IPython splits the line with shlex before argparse sees it; an unclosed quote is then a
    bare ValueError ("No closing quotation"). Make it the same one line as any other mistake."""
    split_and_parse = parser.parse_argstring

    def parse_argstring(argstring, **kwargs):
        try:
            return split_and_parse(argstring, **kwargs)
        except ValueError as e:
            raise UsageError(f"cannot split the line into arguments ({str(e).lower()}): "
                             f"check its quotes") from None

    parser.parse_argstring = parse_argstring


def _suggest_options(msg: str, parser) -> str:
    """argparse's "unrecognized arguments: --structure" with "did you mean --structured?"."""
    prefix = "unrecognized arguments: "
    if not msg.startswith(prefix):
        return msg
    flags = sorted(o for o in parser._option_string_actions if o.startswith("--"))
    unknown = [a for a in msg[len(prefix):].split() if a.startswith("-")]
    if not unknown:
        return msg
    bad = unknown[0].split("=", 1)[0]
    close = [f for f in flags if f.startswith(bad)] or difflib.get_close_matches(bad, flags, n=3)
    hint = (f"did you mean {' or '.join(close)}?" if close else
            f"%{parser.prog}? lists every option")
    what = "unknown option" if len(unknown) == 1 else "unknown options"
    return f"{what} {', '.join(unknown)}: {hint} (options are never abbreviated)"


def step_options(fn):
    """The options every compressing magic takes."""
    for deco in reversed([
        argument("--eval", dest="eval_obj", metavar="OBJ", default=None,
                 help="DataLoader (top-1 accuracy) or callable f(model) -> float|dict; "
                      "remembered for this name"),
        argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)"),
        argument("--no-progress", action="store_true", help="hide progress bars"),
    ]):
        fn = deco(fn)
    return fn


def workspace_for(shell) -> Workspace:
    ws = getattr(shell, "_nbcompress_workspace", None)
    if ws is None:
        ws = Workspace()
        shell._nbcompress_workspace = ws
    return ws


class NBMagics(Magics):
    """Base class with the shared helpers; the magics live in subclasses, one per technique."""

    @property
    def workspace(self) -> Workspace:
        return workspace_for(self.shell)

    # ---------------------------------------------------------------- names
    def _ns(self, local_ns) -> dict:
        ns = dict(self.shell.user_ns)
        if local_ns:
            ns.update(local_ns)
        return ns

    def lookup(self, name: str, local_ns=None, what: str = "name") -> Any:
        """The object a (dotted) name refers to; UsageError naming what was not found."""
        name = name.strip()
        if not _NAME.match(name):
            raise BadInput(f"{what} must be a variable name (optionally dotted, like model.encoder), "
                           f"got {name!r}")
        ns = self._ns(local_ns)
        head, *rest = name.split(".")
        if head not in ns:
            raise BadInput(f"{what}: no variable named {head!r} in the notebook")
        obj = ns[head]
        for i, part in enumerate(rest):
            if not hasattr(obj, part):
                raise BadInput(f"{what}: {'.'.join([head] + rest[:i])} has no attribute {part!r}")
            obj = getattr(obj, part)
        return obj

    def lookup_model(self, name: str, local_ns=None) -> nn.Module:
        obj = self.lookup(name, local_ns)
        if not isinstance(obj, nn.Module):
            raise BadInput(f"{name} is a {type(obj).__name__}, not a torch.nn.Module")
        return obj

    def lookup_loader(self, name: str | None, local_ns=None, what: str = "--data"):
        if name is None:
            return None
        obj = self.lookup(name, local_ns, what)
        if not is_loader(obj):
            raise BadInput(f"{what} {name} is a {type(obj).__name__}, not a torch DataLoader")
        return obj

    def lookup_evaluator(self, name: str | None, local_ns=None):
        if name is None:
            return None
        obj = self.lookup(name, local_ns, "--eval")
        if not (is_loader(obj) or callable(obj)):
            raise BadInput(f"--eval {name} is a {type(obj).__name__}: give a DataLoader or a "
                           f"callable f(model) -> float | dict")
        try:
            check_evaluator(obj)
        except BadInput as e:
            raise type(e)(f"--eval {name}: {e}") from None
        return obj

    def rebind(self, name: str, obj: Any, local_ns=None) -> None:
        head, *rest = name.split(".")
        if not rest:
            self.shell.user_ns[head] = obj
            if local_ns is not None and head in local_ns:
                local_ns[head] = obj
            return
        parent = self.lookup(".".join([head] + rest[:-1]), local_ns)
        setattr(parent, rest[-1], obj)

    # ---------------------------------------------------------------- histories
    @contextmanager
    def transaction(self, name: str, local_ns=None, *, eval_obj=None, eval_name=None,
                    example_input=None, input_shape=None, device=None, latency_mode=None):
        """The history of the model named ``name`` (made on first use) with this command's
        settings, inside one transaction: if the block fails, the settings, versions and (for a
        new name) the history itself are as they were; nothing of the failed command remains."""
        model = self.lookup_model(name, local_ns)
        sources = {"evaluator": f"--eval {eval_name}", "example_input": f"--input-shape {input_shape}",
                   "device": f"--device {device}", "latency_mode": f"--latency {latency_mode}"}
        with self.workspace.transaction(name, model) as h:
            h.configure(evaluator=eval_obj, example_input=example_input, device=device,
                        latency_mode=latency_mode, sources=sources)
            yield h

    def existing_history(self, name: str, local_ns=None) -> History:
        h = self.workspace.get(name)
        if h is None:
            self.lookup_model(name, local_ns)   # a clearer message when the name is wrong
            raise BadInput(f"{name} has no history yet: compress it (or %nbcompress {name}) first")
        return h

    # ---------------------------------------------------------------- generated magics
    def run_technique(self, cls: type[StepConfig], args, line: str, local_ns=None):
        """The body of every technique's magic: the model first (the clearest message), each
        option given on the line parsed by its declared kind, the config built (fields not on
        the line keep their declared defaults), then one undoable step."""
        self.lookup_model(args.name, local_ns)
        spell = magic_spelling(cls)

        def resolve(name, text, opt):
            return self.resolve_value(text, opt, local_ns, what=spell(name, None))

        given = {f.name: opt for f, opt in options_of(cls) if opt.magic and hasattr(args, f.name)}
        typed = {name: getattr(args, name) for name in given}
        values = {name: parse_text(name, opt, typed[name], resolve) for name, opt in given.items()}
        config = cls(**values, device=args.device)
        config.before_magic(self, args.name, local_ns, typed)
        return self.run_step(args.name, config, args, local_ns,
                             magic=f"%{cls.magic_name()} {line}")

    def resolve_value(self, text: str, opt, local_ns, what: str):
        """A name on the magic line as the object it names, by the option's kind."""
        if opt.kind == "loader":
            return self.lookup_loader(text, local_ns, what)
        if opt.kind == "models":
            models = [self.lookup_model_version(t, local_ns, what) for t in split_names(text)]
            if not models:
                raise BadInput(f"{what} needs NAME[,NAME...]")
            return models
        return self.lookup(text, local_ns, what)

    def lookup_model_version(self, token: str, local_ns, what: str) -> nn.Module:
        """``NAME`` (a model in the notebook) or ``NAME@K`` (version K of NAME's history, a
        fresh copy)."""
        if "@" not in token:
            t = self.lookup(token, local_ns, what)
            if not isinstance(t, nn.Module):
                raise BadInput(f"{what} {token} is a {type(t).__name__}, not a torch.nn.Module")
            return t
        name, _, k = token.rpartition("@")
        try:
            k = int(k)
        except ValueError:
            k = -1
        if k < 0:
            raise BadInput(f"{what} {token}: write NAME@K with K a version number (0 is the "
                           f"first)")
        self.lookup_model(name, local_ns)
        h = self.workspace.get(name)
        if h is None:
            raise BadInput(f"{what} {token}: {name} has no history yet (compress it or "
                           f"%nbcompress {name} first)")
        if k >= len(h):
            raise BadInput(f"{what} {token}: {name} has versions 0..{len(h) - 1}")
        return h.version_model(k)

    def run_step(self, name: str, config: StepConfig, args, local_ns=None, magic: str = ""):
        """Apply ``config`` to the model named ``name`` as one undoable step; rebind the name only
        when the step completed (settings given on the line are kept only then, too)."""
        evaluator = self.lookup_evaluator(args.eval_obj, local_ns)
        with self.transaction(name, local_ns, eval_obj=evaluator, eval_name=args.eval_obj,
                              device=args.device) as h:
            report = h.apply(config, progress=not args.no_progress, magic=magic,
                             device=args.device)
            self.rebind(name, h.current, local_ns)
        return report


def parse_shape(text: str):
    return parse_input_shape(text)


def quote(s: str) -> str:
    return shlex.quote(s)
