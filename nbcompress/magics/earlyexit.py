"""%earlyexit: early-exit heads (dynamic computation) as one undoable step."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..techniques.earlyexit import EarlyExitConfig
from .base import NBMagics, split_names, step_options, user_errors


@magics_class
class EarlyExitMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model (rebound to the early-exit model)")
    @argument("--data", metavar="LOADER", default=None,
              help="DataLoader the exit heads are trained on (needed to attach exits)")
    @argument("--exits", metavar="LAYER[,LAYER...]", default=None,
              help="module names, as model.named_modules() gives them, an exit sits after "
                   "(for an nn.Sequential its indices: --exits 2,5)")
    @argument("--every", type=int, metavar="K", default=None,
              help="an exit after every K-th block with weights (default 1), moved past the "
                   "norm/activation/pool blocks after it, never just before the classifier")
    @argument("--threshold", type=float, metavar="P", default=None,
              help="leave at the first exit whose max softmax probability is >= P, in (0, 1] "
                   "(default 0.95); on an early-exit model only the threshold changes")
    @argument("--epochs", type=int, default=None, help="head training epochs (default 5)")
    @argument("--lr", type=float, default=None,
              help="learning rate (default 1e-2, cosine schedule; use less with --joint)")
    @argument("--joint", action="store_true",
              help="train the backbone with the heads (default: backbone frozen)")
    @argument("-T", "--temperature", dest="T", type=float, default=None, metavar="TEMP",
              help="distillation temperature (default 4)")
    @argument("--alpha", type=float, default=None,
              help="weight of distillation from the final output vs the labels, in [0, 1] "
                   "(default 1: distillation only)")
    @argument("--head-pool", type=int, default=None, metavar="S",
              help="heads average-pool each spatial dim to at most S (default 4)")
    @argument("--seed", type=int, default=None, help="seed for head init and training (default 0)")
    @step_options
    def earlyexit(self, line="", local_ns=None):
        """Early exits: classifier heads after some blocks; an easy input leaves early.

        Attaches a small head (average-pool to at most 4x4 + linear) after each chosen block of
        NAME, trains the heads on --data (distilled from the network's own final output, backbone
        frozen unless --joint) and rebinds NAME to an EarlyExitModel. At inference each sample
        leaves at the first exit whose max softmax probability reaches the threshold; the rest of
        the batch goes on. The model must be an nn.Sequential or a module whose forward runs its
        sub-modules once each in order (checked on a batch).

        The dashboard's FLOPs are the average FLOPs actually spent per sample on the --eval data
        (same basis as the network before); the step shows the share of samples per exit and a
        plot of accuracy vs average FLOPs as the threshold sweeps.

        Example::

            %earlyexit cnn --data train_loader --exits 2,5 --threshold 0.9
            %earlyexit cnn --data train_loader --every 1 --epochs 5
            %earlyexit cnn --threshold 0.97      # later: only the threshold (undoable)
        """
        args = parse_argstring(self.earlyexit, line)
        self.lookup_model(args.name, local_ns)
        options = {k: getattr(args, k) for k in ("every", "threshold", "epochs", "lr", "T",
                                                  "alpha", "head_pool", "seed")
                   if getattr(args, k) is not None}
        if args.joint:
            options["joint"] = True
        if args.exits is not None:
            options["exits"] = tuple(split_names(args.exits))
        if args.data is not None:
            options["data"] = self.lookup_loader(args.data, local_ns, "--data")
        config = EarlyExitConfig(device=args.device, **options)
        return self.run_step(args.name, config, args, local_ns, magic=f"%earlyexit {line}")
