"""%prune: weight and neuron/channel pruning, iterative with fine-tuning, lottery tickets,
sensitivity scans."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core import BadInput
from ..importance import IMPORTANCES
from ..prune import PruneConfig
from .base import NBMagics, step_options, user_errors


def _fraction(text: str | None, what: str) -> float | None:
    """A fraction from '0.5', '.5' or '50%'."""
    if text is None:
        return None
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise BadInput(f"{what} must be a number between 0 and 1 (or a percentage like 50%), "
                       f"got {text!r}") from None
    return v


def _amounts(text: str | None) -> tuple | None:
    if text is None:
        return None
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    return tuple(_fraction(p, "--amounts") for p in parts)


@magics_class
class PruneMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model (dotted names like model.encoder work)")
    @argument("amount", nargs="?", default=None,
              help="fraction to remove, 0 < AMOUNT < 1 (or 90%%): of the weights (their sparsity "
                   "after the step) or, with --structured, of the channels/neurons")
    @argument("--structured", action="store_true",
              help="remove whole channels/neurons (a smaller dense network) instead of single "
                   "weights; coupled layers (BatchNorm, residual adds, next layers) follow")
    @argument("--importance", default=None, metavar="|".join(IMPORTANCES),
              help="what to keep: l1 (default for weights), l2 (default for channels), taylor, "
                   "hessian (OBD), activation, bn (BatchNorm scale), random")
    @argument("--scope", default=None, choices=("global", "layer"),
              help="rank all layers together (default for weights) or prune each layer by the "
                   "same amount (default for channels and --lottery)")
    @argument("--layers", default=None, metavar="REGEX",
              help="only layers whose name matches this regular expression (re.search)")
    @argument("--steps", type=int, default=1, metavar="N",
              help="prune in N rounds to the final amount, fine-tuning between rounds")
    @argument("--finetune", default=None, metavar="LOADER",
              help="DataLoader to fine-tune on after each round (pruned weights stay zero)")
    @argument("--epochs", type=int, default=1, metavar="E", help="fine-tuning epochs per round")
    @argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (Adam, cosine)")
    @argument("--data", default=None, metavar="LOADER",
              help="data for taylor/hessian/activation importance (default: the --finetune loader)")
    @argument("--lottery", action="store_true",
              help="lottery ticket: iterative magnitude pruning rewound to the initial weights "
                   "(recorded by %%nbcompress NAME --remember-init), compared with the dense model "
                   "and with a random re-initialisation of the same mask")
    @argument("--sensitivity", action="store_true",
              help="prune each layer alone at several amounts and evaluate; the model is not changed")
    @argument("--amounts", default=None, metavar="LIST",
              help="amounts for --sensitivity (default 0.1,0.3,0.5,0.7,0.9)")
    @argument("--target-flops", default=None, metavar="F",
              help="keep this fraction of the FLOPs (the amount is searched for)")
    @argument("--target-params", default=None, metavar="P",
              help="keep this fraction of the (nonzero) parameters (the amount is searched for)")
    @argument("--round-to", type=int, default=8, metavar="K",
              help="structured: keep channel counts multiples of K (default 8, fast on CPU and "
                   "GPU; layers narrower than 2K use 1)")
    @argument("--sparsity-reg", type=float, default=0.0, metavar="L",
              help="with --importance bn: fine-tune with an L1 penalty L on BatchNorm scales "
                   "before pruning (network slimming)")
    @argument("--seed", type=int, default=0, help="seed for random importance and fine-tuning")
    @step_options
    def prune(self, line="", local_ns=None):
        """Prune a model and rebind the name to the result (``%undo`` goes back).

        Weight pruning zeroes the least important single weights (high sparsity; smaller when
        saved with ``nbcompress.save``, no faster on dense hardware). ``--structured`` removes
        whole channels/neurons with torch-pruning's dependency graph: a smaller network that
        really runs faster. The classifier's outputs are never removed. Returns the step's report;
        per-round, lottery and sensitivity tables are in ``report.result.tables``.

        Examples::

            %prune model 0.9                                  # 90% sparse, global magnitude
            %prune model 0.95 --steps 5 --finetune train_loader --epochs 2
            %prune cnn 0.5 --structured --finetune train_loader --epochs 3
            %prune cnn --structured --target-flops 0.5 --importance taylor --data train_loader
            %prune model 0.94 --lottery --steps 12 --finetune train_loader --epochs 10
            %prune model --sensitivity
        """
        args = parse_argstring(self.prune, line)
        options = {}
        if args.amounts is not None:
            options["amounts"] = _amounts(args.amounts)
        config = PruneConfig(
            amount=_fraction(args.amount, "AMOUNT"), structured=args.structured,
            importance=args.importance, scope=args.scope, layers=args.layers, steps=args.steps,
            finetune=self.lookup_loader(args.finetune, local_ns, "--finetune"),
            epochs=args.epochs, lr=args.lr,
            data=self.lookup_loader(args.data, local_ns, "--data"),
            lottery=args.lottery, sensitivity=args.sensitivity,
            target_flops=_fraction(args.target_flops, "--target-flops"),
            target_params=_fraction(args.target_params, "--target-params"),
            round_to=args.round_to, sparsity_reg=args.sparsity_reg, seed=args.seed,
            device=args.device, **options)
        return self.run_step(args.name, config, args, local_ns, magic=f"%prune {line}")
