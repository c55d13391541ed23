"""The distillation step's config: its options declared once, the checks they cannot express,
and the magic's own check (a model is not its own teacher)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...batches import split_batch
from ...core import BadInput, CompressionResult, FieldError, StepConfig, StepContext
from ...options import check_fields, option
from ...tokens import check_targets, is_token_task
from .probe import check_layer, head, peek_batch, probe, shape_text

__all__ = ["DistillConfig", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "adamw", "sgd")


def _pairs(feats) -> tuple[list[tuple[str, str]], str | None]:
    """``features`` as (student_layer, teacher_layer) pairs, and a message template if it is not
    such a list."""
    if feats is None:
        return [], None
    if isinstance(feats, str):
        feats = [p for p in (s.strip() for s in feats.split(",")) if p]
    if isinstance(feats, tuple) and len(feats) == 2 and all(isinstance(f, str) for f in feats):
        feats = [feats]
    pairs = []
    for f in feats:
        if isinstance(f, str):
            parts = f.split(":")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                return [], f"{{features}} takes STUDENT_LAYER:TEACHER_LAYER pairs, got {f!r}"
            pairs.append((parts[0].strip(), parts[1].strip()))
        elif isinstance(f, (tuple, list)) and len(f) == 2 and all(isinstance(p, str) for p in f):
            pairs.append((f[0], f[1]))
        else:
            return [], (f"{{features}} must be 'student_layer:teacher_layer' strings or "
                        f"(student_layer, teacher_layer) pairs, got {f!r}")
    return pairs, None


@dataclass
class DistillConfig(StepConfig):
    """Knowledge distillation: train the student NAME on the softened outputs of one or more
    teachers.

    Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y). The student
    variable is rebound to the trained student (``%undo NAME`` gives back the untrained one); the
    teachers are used in eval mode without gradients and put back as they were (device, train/eval
    mode of every submodule); their weights never change. The dashboard shows the student before
    and after with the teacher beside it, and a per-class accuracy table when --eval is a
    DataLoader.
    """

    technique: ClassVar[str] = "distill"
    trains_with: ClassVar[str | None] = "loader"
    model_help: ClassVar[str] = ("the variable holding the student model (rebound to the trained "
                                 "one)")
    summary: ClassVar[str] = ("train a small student from a teacher's (or an ensemble's) "
                              "softened outputs")
    examples: ClassVar[tuple] = (
        "%distill student --teacher big --data train_loader --epochs 20 -T 4 --alpha 0.9",
        "%distill student --teacher t1,t2,t3 --data unlabelled_loader --soft-only",
        "%distill student --teacher big --data no3_loader --soft-only --bias-adjust 3",
    )
    teachers: Any = option(
        default_factory=list, kind="models", flag="--teacher", metavar="T1[,T2,...]",
        required=True, unless="teacher_version",
        help="the teacher model(s) by name; several are an ensemble (their softened "
             "probabilities averaged). NAME@K is version K of NAME's history (e.g. model@0: the "
             "model before any compression). Never changed.")
    loader: Any = option(
        None, kind="loader", flag="--data", required=True,
        help="the transfer data: a DataLoader of (x, y) batches, or of inputs only with "
             "--soft-only")
    epochs: int = option(5, kind="int", range="[1, inf)", help="training epochs (default 5)")
    T: float = option(4.0, kind="float", range="(0, inf)", short="-T", flag="--temperature",
                      metavar="TEMP", help="softmax temperature (default 4)")
    alpha: float | None = option(
        None, kind="float", range="[0, 1]",
        help="weight of the soft-target term in [0, 1] (default 0.9; 1 with --soft-only)")
    lr: float = option(1e-3, kind="float", range="(0, inf)", help="learning rate (default 1e-3)")
    optimizer: Any = option("adam", kind="choice", choices=OPTIMIZERS, accepts=(Callable,),
                            help="adam (default), adamw or sgd")
    weight_decay: float = option(0.0, kind="float", range="[0, inf)", magic=False,
                                 help="the optimizer's weight decay")
    scheduler: str | None = option(None, kind="choice", choices=("cosine",), magic=False,
                                   help="learning-rate schedule: None (constant) or 'cosine'")
    soft_only: bool = option(False, kind="bool",
                             help="train on the teacher's outputs alone (unlabelled transfer "
                                  "data)")
    features: Any = option(
        default_factory=list, kind="str", accepts=(list, tuple), metavar="S:T[,...]",
        check=lambda v: _pairs(v)[1],
        help="also match student layer S's output to teacher layer T's through a learned "
             "adapter (1x1 conv / linear, dropped after training)")
    feature_weight: float = option(1.0, kind="float", range="[0, inf)",
                                   help="weight of the feature-matching (MSE) term (default 1)")
    bias_adjust: int | None = option(
        None, kind="int", range="[0, inf)", metavar="CLASS",
        help="after training, raise CLASS's output bias as far as accuracy on the other classes' "
             "transfer data allows (within 0.5 points); for a class missing from the transfer "
             "data")
    bias_tolerance: float = option(
        0.005, kind="float", range="[0, 1)", magic=False,
        help="how much accuracy on the other classes' transfer data the bias raise may cost "
             "(a fraction: 0.005 is 0.5 points)")
    cache_teacher: bool | None = option(
        None, kind="bool", flag="--no-cache", flag_value=False,
        help="run the teacher on every batch even when its outputs could be cached")
    keep_sparsity: bool = option(
        True, kind="bool", magic=False,
        help="weights that are already sparse (pruned: >= 1% exact zeros) keep their zeros")
    seed: int | None = option(0, kind="int", help="seed for the run (default 0)")
    amp: bool | None = option(None, kind="bool", magic=False,
                              help="mixed precision (None: on CUDA only)")
    teacher_version: int | None = option(
        None, kind="int", range="[0, inf)", magic=False,
        help="also learn from version K of this model's own history (0: the model as first "
             "registered), e.g. to win back accuracy after pruning; needs the step to run "
             "through a History (the magics do)")

    def __post_init__(self):
        if self.teachers is None:
            self.teachers = []
        elif isinstance(self.teachers, nn.Module):
            self.teachers = [self.teachers]
        elif isinstance(self.teachers, tuple):
            self.teachers = list(self.teachers)
        if isinstance(self.features, str):
            self.features = [p for p in (s.strip() for s in self.features.split(",")) if p]

    # --------------------------------------------------------------- resolved settings
    @property
    def effective_alpha(self) -> float:
        if self.alpha is None:
            return 1.0 if self.soft_only else 0.9
        return float(self.alpha)

    def teacher_list(self) -> list[nn.Module]:
        t = self.teachers
        if isinstance(t, nn.Module):
            return [t]
        if isinstance(t, (list, tuple)):
            return list(t)
        raise FieldError(f"{{teachers}} must be a torch.nn.Module or a list of them, got "
                         f"{type(t).__name__}")

    def feature_pairs(self) -> list[tuple[str, str]]:
        pairs, problem = _pairs(self.features)
        if problem:
            raise FieldError(problem)
        return pairs

    def describe(self) -> str:
        teachers = self.teacher_list() if isinstance(self.teachers, (nn.Module, list, tuple)) else []
        names = [type(t).__name__ for t in teachers]
        if self.teacher_version is not None:
            names.append(f"version {self.teacher_version}")
        parts = [f"teachers={len(names)}" if len(names) != 1 else f"teacher={names[0]}",
                 f"epochs={self.epochs}", f"T={self.T:g}", f"alpha={self.effective_alpha:g}"]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("lr", "optimizer", "weight_decay", "scheduler", "feature_weight",
                     "bias_tolerance", "cache_teacher", "keep_sparsity", "seed", "amp"):
            v = getattr(self, name)
            if v != defaults[name]:
                parts.append(f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}")
        if self.soft_only:
            parts.append("soft_only")
        pairs, _ = _pairs(self.features)
        if pairs:
            parts.append("features=" + ",".join(f"{a}:{b}" for a, b in pairs))
        if self.bias_adjust is not None:
            parts.append(f"bias_adjust={self.bias_adjust}")
        return " ".join(parts)

    # --------------------------------------------------------------- checks
    def before_magic(self, magics, name: str, local_ns, typed: dict) -> None:
        """Before any work (no history made, nothing measured): a model is not its own teacher."""
        from .teachers import check_magic_teachers

        check_magic_teachers(magics, name, self.teacher_list(), local_ns,
                             typed.get("teachers", ""))
        check_fields(self)          # the declared checks too, before the history measures anything

    def validate(self, model: nn.Module) -> None:
        from .bias import output_bias_layer
        from .teachers import check_teachers_apart
        from .train_loop import not_cacheable

        teachers = self.teacher_list()
        check_teachers_apart(model, teachers)
        if not any(p.requires_grad and p.is_floating_point() for p in model.parameters()):
            raise BadInput("the student has no trainable floating-point parameters (is it "
                           "quantized or frozen?): distillation trains the student")
        if self.soft_only and self.alpha is not None and self.alpha != 1:
            raise FieldError(f"{{soft_only}} trains on teacher outputs alone (alpha = 1); "
                             f"{{alpha={self.alpha:g}}} contradicts it")
        pairs = self.feature_pairs()
        if pairs and not teachers:
            raise FieldError("{features} needs a {teachers} model (its layers are matched)")
        s_mods = dict(model.named_modules())
        t_mods = dict(teachers[0].named_modules()) if teachers else {}
        for s_name, t_name in pairs:
            check_layer(s_name, s_mods, "student")
            check_layer(t_name, t_mods, "teacher" if len(teachers) == 1 else "first teacher")
        if self.cache_teacher:
            why = not_cacheable(self.loader, pairs)
            if why:
                raise FieldError(f"cannot cache the teacher outputs: {why}")

        # One small batch through the student and every teacher: shapes must agree.
        x, y = split_batch(peek_batch(self.loader))
        if y is None and self.effective_alpha < 1:
            raise FieldError("{loader} yields inputs only (no labels): use {soft_only} (alpha = 1) "
                             "to train on the teacher's outputs alone")
        x = head(x, 2)
        probe_student = model
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
            import copy

            probe_student = copy.deepcopy(model)      # a lazy module would initialise itself
        s_out, s_feats = probe(probe_student, x, [s for s, _ in pairs], "student")
        if s_out.dim() < 2:
            raise BadInput(f"the student's output has shape {tuple(s_out.shape)}: distillation "
                           f"needs class scores (N, C)")
        y = head(y, 2) if isinstance(y, torch.Tensor) else y
        tokens = is_token_task(s_out, x, y)
        if self.effective_alpha < 1 and isinstance(y, torch.Tensor) and y.numel():
            check_targets(s_out, x, y, "the labels of {loader}")   # hard labels are trained on
            c = s_out.shape[1]
            if not tokens and not y.is_floating_point() and (int(y.min()) < 0 or int(y.max()) >= c):
                lo, hi = int(y.min()), int(y.max())
                raise FieldError(f"{{loader}} has label {hi if hi >= c else lo}, but the student "
                                 f"scores {c} classes (labels 0..{c - 1}); is it the data this "
                                 f"model takes?")
        if tokens and self.cache_teacher:
            raise FieldError("cannot cache the teacher outputs: a language model's are a "
                             "[batch, seq, vocab] tensor per batch (computed batch by batch)")
        if tokens and self.bias_adjust is not None:
            raise FieldError("{bias_adjust} raises one class's bias; the student is a language "
                             "model scoring tokens")
        self._check_teacher_outputs(teachers, x, s_out, s_feats, pairs)
        if self.bias_adjust is not None:
            n_cls = s_out.shape[1]
            if self.bias_adjust >= n_cls:
                raise FieldError(f"{{bias_adjust={self.bias_adjust}}}: the student scores {n_cls} "
                                 f"classes (0..{n_cls - 1})")
            if output_bias_layer(probe_student, x) is None:
                raise FieldError("{bias_adjust} needs the student's class scores to come straight "
                                 "from a Linear layer with a bias; none found")

    def _check_teacher_outputs(self, teachers, x, s_out, s_feats, pairs) -> None:
        from .adapters import adapter_spec

        for i, t in enumerate(teachers):
            t_out, t_feats = probe(t, x, [tn for _, tn in pairs] if i == 0 else [],
                                   "teacher" if len(teachers) == 1 else f"teacher {i + 1}")
            if t_out.shape[1:] != s_out.shape[1:]:
                who = "the teacher" if len(teachers) == 1 else f"teacher {i + 1}"
                raise BadInput(f"{who}'s output has shape {shape_text(t_out)} but the student's "
                               f"has {shape_text(s_out)}: they must score the same classes")
            if i == 0:
                for (s_name, t_name), sf, tf in zip(pairs, s_feats, t_feats):
                    adapter_spec(s_name, t_name, sf.shape, tf.shape)     # raises if impossible

    # --------------------------------------------------------------- the step
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        from .train_loop import run_distill

        return run_distill(self, model, ctx)
