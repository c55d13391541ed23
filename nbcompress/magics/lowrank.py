"""%lowrank: low-rank factorisation and depthwise-separable layers."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..techniques.lowrank import CONV_MODES, LowRankConfig
from .base import NBMagics, step_options, user_errors


def _unquote(text: str | None) -> str | None:
    """IPython keeps the quotes around an argument (``--layers "layer|down"``): drop one
    matching pair."""
    if text and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


@magics_class
class LowRankMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model (dotted names like model.encoder work)")
    @argument("--rank", type=int, default=None, metavar="R",
              help="rank of every factorised layer, capped at each layer's full rank "
                   "(for --conv separable: the depth multiplier; for tucker: both ranks)")
    @argument("--ratio", type=float, default=None, metavar="F",
              help="rank as a fraction of each layer's full rank, in (0, 1]")
    @argument("--energy", type=float, default=None, metavar="E",
              help="keep this share of each layer's squared singular values, in (0, 1] "
                   "(the default, 0.9, when no rank option is given; separable convs then use "
                   "depth multiplier 1)")
    @argument("--target-params", default=None, metavar="P",
              help="parameters of the whole model after: a count (80000), a fraction (0.33) or "
                   "N times fewer (3x); ranks are allocated across layers by singular values "
                   "(each kept one carries at least a threshold share of its layer's energy, "
                   "the lowest threshold that fits)")
    @argument("--layers", default=None, metavar="REGEX",
              help="only layers whose name matches this regular expression (re.search; "
                   "quotes optional: --layers \"layer|down\"). Without it the classifier (the "
                   "layer producing the model's output) is kept whole; a pattern matching it "
                   "(--layers . for every layer) factorises it too")
    @argument("--conv", default="svd", choices=CONV_MODES,
              help="how to factorise k x k convs: svd (k x k conv to r channels + 1x1), tucker "
                   "(1x1, k x k core, 1x1), separable (depthwise + pointwise), none (leave them)")
    @argument("--finetune", default=None, metavar="LOADER",
              help="DataLoader to fine-tune on after factorising (the shared train loop)")
    @argument("--epochs", type=int, default=1, help="fine-tuning epochs (default 1)")
    @argument("--lr", type=float, default=3e-4,
              help="fine-tuning learning rate, Adam with cosine decay (default 3e-4; heavy "
                   "factorisations such as --conv separable recover better at 1e-3)")
    @argument("--data", default=None, metavar="LOADER",
              help="batches to re-estimate BatchNorm statistics with after factorising "
                   "(default: the --finetune loader)")
    @step_options
    def lowrank(self, line="", local_ns=None):
        """Factorise the model's Linear and Conv2d layers into low-rank or depthwise-separable
        forms, and rebind the name to the result (``%undo`` goes back).

        A Linear becomes two Linears through ``r`` units (truncated SVD). A k x k Conv2d becomes
        two or three convs (``--conv``). A layer whose factorised form would not be smaller is kept
        and named in the notes, and so is the classifier (the layer producing the model's output)
        unless ``--layers`` selects it. With a loader (``--data`` or ``--finetune``) the BatchNorm
        statistics are re-estimated for the new layers, then ``--finetune`` trains with the shared
        loop. The report lists, per factorised layer, its rank, parameters and
        FLOPs before and after, the energy kept and the relative reconstruction error
        ``||W - W_hat|| / ||W||``. Returns the step's report.

        Examples::

            %lowrank model --target-params 3x --finetune train_loader --epochs 1
            %lowrank cnn --conv separable --layers "layer|down" --finetune train_loader --lr 1e-3
            %lowrank net --energy 0.8 --layers "fc[12]"
        """
        args = parse_argstring(self.lowrank, line)
        config = LowRankConfig(
            rank=args.rank, ratio=args.ratio, energy=args.energy,
            target_params=_unquote(args.target_params), layers=_unquote(args.layers), conv=args.conv,
            finetune=self.lookup_loader(args.finetune, local_ns, "--finetune"),
            data=self.lookup_loader(args.data, local_ns, "--data"),
            epochs=args.epochs, lr=args.lr, device=args.device)
        return self.run_step(args.name, config, args, local_ns, magic=f"%lowrank {line}")
