"""%nbcompress, %undo, %redo, %compress_history."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core import BadInput
from ..metrics import LATENCY_MODES, check_latency_mode
from .base import NBMagics, parse_shape, user_errors


def _steps(text: str | None, kind: str) -> int:
    if text is None:
        return 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise BadInput(f"%{kind} takes a positive number of steps, got {text!r}")
    return n


@magics_class
class CoreMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model (dotted names like model.encoder work)")
    @argument("--eval", dest="eval_obj", metavar="OBJ", default=None,
              help="DataLoader (top-1 accuracy) or callable f(model) -> float|dict, "
                   "remembered for this name and reused by every step")
    @argument("--input-shape", default=None, metavar="SHAPE",
              help="example input shape for FLOPs and latency, e.g. 1,1,28,28 "
                   "(default: one sample of the --eval loader)")
    @argument("--device", default=None, help="default work device for this name's steps")
    @argument("--latency", default=None, metavar="|".join(LATENCY_MODES),
              help="how latency is timed: eager (default, as the model is), channels_last, "
                   "deployed (traced + torch.jit.optimize_for_inference: BatchNorm folded, conv + "
                   "ReLU fused) or onnxruntime (exported to ONNX, ONNX Runtime CPU, one thread); "
                   "remembered for this name")
    @argument("--remember-init", action="store_true",
              help="record the current weights as the initial weights (lottery-ticket rewind)")
    def nbcompress(self, line="", local_ns=None):
        """Register a model: remember its evaluator and example input, show its dashboard.

        Returns the report (size, FLOPs, latency, accuracy). The first registration also records
        the initial weights used by ``%prune --lottery``.
        """
        args = parse_argstring(self.nbcompress, line)
        shape = parse_shape(args.input_shape) if args.input_shape else None
        evaluator = self.lookup_evaluator(args.eval_obj, local_ns)
        import torch

        if args.latency is not None:
            check_latency_mode(args.latency)
        with self.transaction(args.name, local_ns, eval_obj=evaluator, eval_name=args.eval_obj,
                              example_input=torch.randn(*shape) if shape else None,
                              input_shape=args.input_shape, device=args.device,
                              latency_mode=args.latency) as h:
            if args.remember_init:
                h.remember_init()
            return h.measure_report()

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model")
    @argument("steps", nargs="?", default=None, help="how many steps back (default 1)")
    def undo(self, line="", local_ns=None):
        """Rebind the name to the previous version of the model (bit-identical weights)."""
        return self._walk(parse_argstring(self.undo, line), "undo", local_ns)

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model")
    @argument("steps", nargs="?", default=None, help="how many steps forward (default 1)")
    def redo(self, line="", local_ns=None):
        """Rebind the name to the next version after an undo."""
        return self._walk(parse_argstring(self.redo, line), "redo", local_ns)

    def _walk(self, args, direction: str, local_ns):
        """%undo / %redo: move the history N steps and rebind the name to that version."""
        n = _steps(args.steps, direction)
        self.existing_history(args.name, local_ns)
        with self.transaction(args.name, local_ns) as h:
            report = getattr(h, direction)(n)
            self.rebind(args.name, h.current, local_ns)
        return report

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model")
    @argument("--no-plot", action="store_true", help="only the table, no size/accuracy plot")
    def compress_history(self, line="", local_ns=None):
        """The name's versions as a pandas DataFrame (row 0 the baseline, then one row a step),
        with a size-vs-accuracy plot."""
        args = parse_argstring(self.compress_history, line)
        self.existing_history(args.name, local_ns)
        with self.transaction(args.name, local_ns) as h:
            df = h.table()
        if not args.no_plot:
            from IPython.display import Image, display

            from ..report import history_plot_png

            display(Image(data=history_plot_png(df), format="png"))
        return df
