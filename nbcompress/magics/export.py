"""%export: a model, or any version of its history, written to ONNX / .pt2 / a state_dict and
checked in its runtime. The options are :class:`nbcompress.deploy.ExportConfig`'s fields."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core import BadInput
from ..deploy import ExportConfig, run_export
from ..options import check_fields, magic_spelling, options_of, parse_text
from .base import NBMagics, parse_shape, user_errors
from .technique import arguments

_SPELL = magic_spelling(ExportConfig)


def _spelled(fn):
    """Errors naming ExportConfig's fields are spelled as this magic's flags (see user_errors)."""
    fn.spell = _SPELL
    return fn


def _export_arguments(fn):
    fn = argument("--input-shape", default=None, metavar="SHAPE",
                  help="example input shape to trace the model on, e.g. 1,1,28,28 (default: "
                       "the name's example input, from %%nbcompress NAME --eval LOADER)")(fn)
    for deco in reversed(arguments(ExportConfig)):
        fn = deco(fn)
    return fn


@magics_class
class ExportMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @_spelled
    @magic_arguments()
    @_export_arguments
    def export(self, line="", local_ns=None):
        """Write the model (or version K of its history: ``NAME@K``) to a file a runtime loads:
        ONNX (run in ONNX Runtime), .pt2 (torch.export) or a state_dict of plain tensors. The file
        is loaded back in its runtime and compared with the model (outputs on the example input;
        with --check LOADER, top-1 agreement and accuracy on its data) and timed there beside
        PyTorch, one thread each. A failed export writes nothing. Returns the export's report;
        the history's table shows each version's latest export.

        Examples::

            %export model model.onnx
            %export model@0 original.onnx --check test_loader
            %export model model.pt2
        """
        args = parse_argstring(self.export, line)
        name, _, k = args.name.partition("@")
        model = self.lookup_model(name, local_ns)
        values = {}
        for f, opt in options_of(ExportConfig):
            if hasattr(args, f.name):
                values[f.name] = parse_text(
                    f.name, opt, getattr(args, f.name),
                    lambda n, t, o: self.resolve_value(t, o, local_ns, what=_SPELL(n, None)))
        cfg = ExportConfig(**values)
        check_fields(cfg)
        shape = parse_shape(args.input_shape) if args.input_shape else None
        h = self.workspace.get(name)
        if k and h is None:
            raise BadInput(f"{args.name}: {name} has no history yet (compress it or "
                           f"%nbcompress {name} first)")
        if h is None:
            if shape is None:
                raise BadInput(f"%export traces the model on an example input: give "
                               f"--input-shape SHAPE (or %nbcompress {name} --eval LOADER first)")
            import torch

            return self._labelled(run_export(model, cfg, torch.randn(*shape)), args)
        with self.transaction(name, local_ns) as h:
            version = self._version(h, args.name, k)
            which = h.versions[version]
            target = h.current if version == h.pos else h.version_model(version)
            if shape is not None:
                import torch

                example = torch.randn(*shape)
            else:
                example = h._example()
            report = self._labelled(run_export(target, cfg, example), args, version)
            which.exports.append(report.as_row())
        return report

    @staticmethod
    def _version(h, token: str, k: str) -> int:
        if not k:
            return h.pos
        try:
            version = int(k)
        except ValueError:
            version = -1
        if not 0 <= version < len(h):
            raise BadInput(f"{token}: no such version; {h.name} has versions 0..{len(h) - 1}")
        return version

    @staticmethod
    def _labelled(report, args, version=None):
        name = args.name.partition("@")[0]
        report.name = name if version is None else f"{name}@{version}"
        if report.check is not None and hasattr(args, "check"):
            report.check["label"] = str(args.check)
        return report
