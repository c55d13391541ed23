"""%distill: train a student from a teacher (or an ensemble) as one undoable step."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
import torch
from torch import nn

from ..core import BadInput
from ..distill import DistillConfig, check_teachers_apart
from .base import NBMagics, split_names, step_options, user_errors


@magics_class
class DistillMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the student model (rebound to the trained one)")
    @argument("--teacher", metavar="T1[,T2,...]", default=None,
              help="the teacher model(s) by name; several are an ensemble (their softened "
                   "probabilities averaged). NAME@K is version K of NAME's history (e.g. "
                   "model@0: the model before any compression). Never changed.")
    @argument("--data", metavar="LOADER", default=None,
              help="the transfer data: a DataLoader of (x, y) batches, or of inputs only with "
                   "--soft-only")
    @argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    @argument("-T", "--temperature", dest="T", type=float, default=4.0, metavar="TEMP",
              help="softmax temperature (default 4)")
    @argument("--alpha", type=float, default=None,
              help="weight of the soft-target term in [0, 1] (default 0.9; 1 with --soft-only)")
    @argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    @argument("--optimizer", default="adam", help="adam (default), adamw or sgd")
    @argument("--soft-only", action="store_true",
              help="train on the teacher's outputs alone (unlabelled transfer data)")
    @argument("--features", metavar="S:T[,...]", default=None,
              help="also match student layer S's output to teacher layer T's through a learned "
                   "adapter (1x1 conv / linear, dropped after training)")
    @argument("--feature-weight", type=float, default=1.0,
              help="weight of the feature-matching (MSE) term (default 1)")
    @argument("--bias-adjust", type=int, default=None, metavar="CLASS",
              help="after training, raise CLASS's output bias as far as accuracy on the other "
                   "classes' transfer data allows (within 0.5 points); for a class missing from "
                   "the transfer data")
    @argument("--no-cache", action="store_true",
              help="run the teacher on every batch even when its outputs could be cached")
    @argument("--seed", type=int, default=0, help="seed for the run (default 0)")
    @step_options
    def distill(self, line="", local_ns=None):
        """Knowledge distillation: train the student NAME on the softened outputs of one or more
        teachers.

        Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y). The
        student variable is rebound to the trained student (``%undo NAME`` gives back the
        untrained one); the teachers are used in eval mode without gradients and put back as they
        were. The dashboard shows the student before and after with the teacher beside it, and a
        per-class accuracy table when --eval is a DataLoader.

        Example::

            %distill student --teacher big --data train_loader --epochs 20 -T 4 --alpha 0.9
            %distill student --teacher t1,t2,t3 --data unlabelled_loader --soft-only
            %distill student --teacher big --data no3_loader --soft-only --bias-adjust 3
        """
        args = parse_argstring(self.distill, line)
        student = self.lookup_model(args.name, local_ns)   # the student first: the clearest message
        if not args.teacher:
            raise BadInput("%distill needs --teacher NAME[,NAME...] (the trained model(s) to "
                           "learn from)")
        if not args.data:
            raise BadInput("%distill needs --data LOADER (the transfer data)")
        teachers, names = [], []
        for tname in split_names(args.teacher):
            if "@" in tname:
                t = self._version(tname, local_ns)
                if self._is_current_version(tname, t, student, local_ns):
                    raise BadInput(self._current_version(tname, args.name))
            else:
                t = self.lookup(tname, local_ns, "--teacher")
                if not isinstance(t, nn.Module):
                    raise BadInput(f"--teacher {tname} is a {type(t).__name__}, not a "
                                   f"torch.nn.Module")
            teachers.append(t)
            names.append(tname)
        if not teachers:
            raise BadInput("%distill needs --teacher NAME[,NAME...]")
        # before any work (no history, no measuring): a model is not its own teacher
        h = self.workspace.get(args.name)
        earlier = (f"--teacher {args.name}@0: {args.name} as first registered"
                   if h is not None and (h.pos > 0 or h.current is not student) else
                   f"--teacher {args.name}@0 once {args.name} has been compressed")
        check_teachers_apart(student, teachers, args.name, names, earlier)
        loader = self.lookup_loader(args.data, local_ns, "--data")
        config = DistillConfig(teachers=teachers, loader=loader, epochs=args.epochs, T=args.T,
                               alpha=args.alpha, lr=args.lr, optimizer=args.optimizer,
                               soft_only=args.soft_only, features=args.features or [],
                               feature_weight=args.feature_weight, bias_adjust=args.bias_adjust,
                               cache_teacher=False if args.no_cache else None, seed=args.seed,
                               device=args.device)
        return self.run_step(args.name, config, args, local_ns, magic=f"%distill {line}")

    def _is_current_version(self, token: str, teacher: nn.Module, student: nn.Module,
                            local_ns) -> bool:
        """Whether ``--teacher NAME@K`` is the student itself: NAME is the student and version K
        is the one it is now (same object, or a copy with exactly its weights)."""
        if teacher is student:
            return True
        name, _, k = token.rpartition("@")
        h = self.workspace.get(name)
        if h is None or self.lookup(name, local_ns) is not student or int(k) != h.pos:
            return False
        a, b = teacher.state_dict(), student.state_dict()
        return a.keys() == b.keys() and all(
            isinstance(a[n], torch.Tensor) and isinstance(b[n], torch.Tensor)
            and a[n].shape == b[n].shape and a[n].dtype == b[n].dtype
            and torch.equal(a[n].to(b[n].device), b[n]) for n in a)

    def _current_version(self, token: str, student: str) -> str:
        """The message for a ``--teacher NAME@K`` that is the student's current version."""
        name = token.rpartition("@")[0]
        h = self.workspace.get(name)
        pos = h.pos if h is not None else 0
        if pos:
            return (f"--teacher {token} is the student {student} itself (the current version): "
                    f"pick an earlier one ({name}@0..{name}@{pos - 1}) or another model")
        return (f"--teacher {token} is the student {student} itself (the current version; "
                f"{name} has no earlier one yet): distil from another model, or compress "
                f"{name} first")

    def _version(self, token: str, local_ns) -> nn.Module:
        """``NAME@K``: version K of NAME's history."""
        name, _, k = token.rpartition("@")
        try:
            k = int(k)
        except ValueError:
            k = -1
        if k < 0:
            raise BadInput(f"--teacher {token}: write NAME@K with K a version number (0 is the "
                           f"first)")
        self.lookup_model(name, local_ns)
        h = self.workspace.get(name)
        if h is None:
            raise BadInput(f"--teacher {token}: {name} has no history yet (compress it or "
                           f"%nbcompress {name} first)")
        if k >= len(h):
            raise BadInput(f"--teacher {token}: {name} has versions 0..{len(h) - 1}")
        return h.version_model(k)
