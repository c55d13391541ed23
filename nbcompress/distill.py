"""Knowledge distillation: train a small student from a large teacher's (or an ensemble's) outputs.

The loss (Hinton, Vinyals & Dean 2015)::

    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .core import BadInput, CompressionResult, StepConfig, StepContext, compress, model_device, register_technique
from .train import forward_batch

__all__ = ["soft_target_loss", "soft_target_loss_from_probs", "distillation_loss", "looks_like_probs",
           "DistillConfig", "distill", "choose_bias_raise", "MLPStudent", "mlp_student",
           "demo_config", "check_teachers_apart", "shared_parameters"]


# ---------------------------------------------------------------------------------- the losses

def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     T: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    Both arguments are raw class scores ``(N, C)`` (any extra trailing dims are treated as more
    positions: the class dim is dim 1, as in ``F.cross_entropy``). Computed in float32 whatever the
    autocast dtype; gradients flow into ``student_logits`` only (the teacher is detached).
    """
    _check_T(T)
    s, t = _as_nc(student_logits), _as_nc(teacher_logits.detach())
    _check_same_shape(s, t)
    log_q = F.log_softmax(s.float() / T, dim=1)
    log_p = F.log_softmax(t.float() / T, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True) / s.shape[0]
    return kl * (T * T)


def soft_target_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                                T: float = 4.0) -> torch.Tensor:
    """As :func:`soft_target_loss`, with the teacher given as probabilities already softened at
    temperature ``T`` (e.g. an ensemble's averaged ``softmax(t_k / T)``)."""
    _check_T(T)
    s, p = _as_nc(student_logits), _as_nc(teacher_probs.detach())
    _check_same_shape(s, p)
    log_q = F.log_softmax(s.float() / T, dim=1)
    kl = F.kl_div(log_q, p.float(), reduction="sum") / s.shape[0]
    return kl * (T * T)


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor, targets, T: float = 4.0,
                      alpha: float = 0.9, *, teacher_is_probs: bool | None = None) -> torch.Tensor:
    """``alpha * soft_target_loss + (1 - alpha) * cross_entropy(student, targets)``.

    ``teacher``: the teacher's logits, or its probabilities softened at ``T`` (averaged over an
    ensemble). ``teacher_is_probs``: say which; ``None`` decides from the values (non-negative,
    each row summing to 1 within 1e-3: probabilities). ``targets``: class indices ``(N,)`` or
    soft / one-hot labels ``(N, C)``; may be ``None`` only when ``alpha == 1`` (soft targets only,
    unlabelled transfer data).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise BadInput(f"alpha must be in [0, 1], got {alpha}")
    if teacher_is_probs is None:
        teacher_is_probs = looks_like_probs(teacher)
    if alpha > 0:
        soft = (soft_target_loss_from_probs if teacher_is_probs else soft_target_loss)(
            student_logits, teacher, T)
    else:
        _check_T(T)
        soft = None
    if alpha == 1.0:
        return soft
    if targets is None:
        raise BadInput("hard-label term needs targets: pass labels, or alpha=1 (soft targets "
                         "only) for unlabelled data")
    s = student_logits.float()
    if targets.is_floating_point():
        targets = targets.float()
    hard = F.cross_entropy(s, targets)
    if soft is None:
        return hard
    return alpha * soft + (1.0 - alpha) * hard


def looks_like_probs(x: torch.Tensor, tol: float = 1e-3) -> bool:
    """Whether ``x`` (N, C, ...) holds probabilities over dim 1: non-negative, rows summing to 1."""
    x = x.detach()
    if x.numel() == 0 or x.dim() < 2:
        return False
    if bool((x < 0).any()):
        return False
    return bool(((x.float().sum(dim=1) - 1.0).abs() <= tol).all())


def _check_T(T) -> None:
    if not isinstance(T, (int, float)) or isinstance(T, bool) or not T > 0 or T != T or T == float("inf"):
        raise BadInput(f"temperature T must be a positive finite number, got {T!r}")


def _as_nc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, d1, ...) -> (N * d1 * ..., C): class dim 1 as in F.cross_entropy."""
    if x.dim() < 2:
        raise BadInput(f"expected class scores of shape (N, C), got shape {tuple(x.shape)}")
    if x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x


def _check_same_shape(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise BadInput(f"student scores have shape {tuple(s.shape)} but the teacher's have "
                         f"{tuple(t.shape)}")


# --------------------------------------------------------------------------- a small student

class MLPStudent(nn.Module):
    """A small fully connected network: ``in_features -> hidden... -> num_classes``, ReLU between,
    optional dropout. Layers are ``fc1 .. fcK`` (the last one gives the class scores), so
    ``MLPStudent(784, (32, 16))`` is the 784-32-16-10 student (25,818 parameters, about 10x
    smaller than LeNet-300-100). Accepts ``(N, 1, 28, 28)`` or ``(N, 784)``."""

    def __init__(self, in_features: int = 784, hidden: tuple = (32, 16), num_classes: int = 10,
                 dropout: float = 0.0, *, seed: int | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.hidden = tuple(int(h) for h in hidden)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        sizes = (self.in_features,) + self.hidden + (self.num_classes,)
        self.n_layers = len(sizes) - 1
        with _seeded(seed):
            for i in range(self.n_layers):
                setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.n_layers):
            x = F.relu(getattr(self, f"fc{i}")(x))
            if self.dropout:
                x = F.dropout(x, self.dropout, self.training)
        return getattr(self, f"fc{self.n_layers}")(x)


def mlp_student(hidden: tuple = (32, 16), in_features: int = 784, num_classes: int = 10,
                dropout: float = 0.0, seed: int | None = None) -> MLPStudent:
    """A fresh :class:`MLPStudent` (default 784-32-16-10)."""
    return MLPStudent(in_features, hidden, num_classes, dropout, seed=seed)


@contextlib.contextmanager
def _seeded(seed):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


# ------------------------------------------------------------------------------- the config

OPTIMIZERS = ("adam", "adamw", "sgd")
_AUTO_CACHE_LIMIT = 256 << 20      # bytes of cached teacher probabilities we keep without asking


@register_technique
@dataclass
class DistillConfig(StepConfig):
    """Train the model (the *student*) on the softened outputs of ``teachers``.

    - ``teachers``: one ``nn.Module`` or a list (an ensemble: softened probabilities averaged).
      They are the caller's objects: used in eval mode under ``no_grad`` on the work device, and
      put back where they were (device, train/eval mode of every submodule); weights never change.
    - ``loader``: the transfer data, ``(x, y)`` batches, or inputs only with ``soft_only``.
    - ``T``: temperature; ``alpha``: weight of the soft-target term (default 0.9, and 1 with
      ``soft_only``); the loss is ``alpha*T^2*KL(p_T||q_T) + (1-alpha)*CE(s, y)``.
    - ``features``: ``[(student_layer, teacher_layer), ...]`` or ``"s:t,s2:t2"``: FitNets-style
      hints. The student layer's output goes through a learned adapter (1x1 conv for feature
      maps, linear otherwise) and is pulled towards the first teacher's layer output by
      ``feature_weight * MSE``. Adapters train with the student and are dropped after.
    - ``bias_adjust``: a class whose output bias is raised after training (for a class missing
      from the transfer data): the largest raise that keeps accuracy on the transfer data of the
      other classes within ``bias_tolerance`` (0.5 points) of its unadjusted value; that class's
      examples are never used.
    - ``cache_teacher``: compute the teacher outputs once and reuse them every epoch. ``None``
      (auto): when the loader is a plain ``TensorDataset`` (no augmentation possible) with the
      default collate and no ``features``; the data order is the loader's own either way.
    - ``keep_sparsity``: weights that are already sparse (pruned: >= 1% exact zeros) keep their
      zeros during training.
    - ``seed``: seeds the run (dropout, adapter init); the loader's shuffling is its own.
    - ``teacher_version``: also learn from version K of this model's own history (0: the model
      as first registered, before any compression), e.g. to win back accuracy after pruning.
      Needs the step to run through a :class:`~nbcompress.History` (the magics do).
    """

    technique: ClassVar[str] = "distill"
    teachers: Any = field(default_factory=list)
    loader: Any = None
    epochs: int = 5
    T: float = 4.0
    alpha: float | None = None
    lr: float = 1e-3
    optimizer: Any = "adam"
    weight_decay: float = 0.0
    scheduler: str | None = None
    soft_only: bool = False
    features: Any = field(default_factory=list)
    feature_weight: float = 1.0
    bias_adjust: int | None = None
    bias_tolerance: float = 0.005
    cache_teacher: bool | None = None
    keep_sparsity: bool = True
    seed: int | None = 0
    amp: bool | None = None
    teacher_version: int | None = None

    def __post_init__(self):
        if isinstance(self.teachers, nn.Module):
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
        raise BadInput(f"teachers must be a torch.nn.Module or a list of them, got {type(t).__name__}")

    def feature_pairs(self) -> list[tuple[str, str]]:
        feats = self.features
        if feats is None:
            return []
        if isinstance(feats, str):
            feats = [p for p in (s.strip() for s in feats.split(",")) if p]
        if isinstance(feats, tuple) and len(feats) == 2 and all(isinstance(f, str) for f in feats):
            feats = [feats]
        pairs = []
        for f in feats:
            if isinstance(f, str):
                parts = f.split(":")
                if len(parts) != 2 or not all(p.strip() for p in parts):
                    raise BadInput(f"--features takes STUDENT_LAYER:TEACHER_LAYER pairs, got {f!r}")
                pairs.append((parts[0].strip(), parts[1].strip()))
            elif isinstance(f, (tuple, list)) and len(f) == 2 and all(isinstance(p, str) for p in f):
                pairs.append((f[0], f[1]))
            else:
                raise BadInput(f"features must be 'student_layer:teacher_layer' strings or "
                               f"(student_layer, teacher_layer) pairs, got {f!r}")
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
        try:
            pairs = self.feature_pairs()
        except BadInput:
            pairs = []
        if pairs:
            parts.append("features=" + ",".join(f"{a}:{b}" for a, b in pairs))
        if self.bias_adjust is not None:
            parts.append(f"bias_adjust={self.bias_adjust}")
        return " ".join(parts)

    # --------------------------------------------------------------- validation
    def validate(self, model: nn.Module) -> None:
        teachers = self.teacher_list()
        if self.teacher_version is not None and (not _is_int(self.teacher_version)
                                                 or self.teacher_version < 0):
            raise BadInput(f"teacher_version must be a version number >= 0, got "
                           f"{self.teacher_version!r}")
        if not teachers and self.teacher_version is None:
            raise BadInput("distillation needs at least one teacher (--teacher NAME[,NAME...])")
        for i, t in enumerate(teachers):
            if not isinstance(t, nn.Module):
                raise BadInput(f"teacher {i + 1} is a {type(t).__name__}, not a torch.nn.Module")
        check_teachers_apart(model, teachers)
        if not any(p.requires_grad and p.is_floating_point() for p in model.parameters()):
            raise BadInput("the student has no trainable floating-point parameters (is it "
                           "quantized or frozen?): distillation trains the student")
        if not isinstance(self.loader, DataLoader):
            raise BadInput(f"the transfer data (--data) must be a torch DataLoader, got "
                           f"{type(self.loader).__name__}")
        if not _is_int(self.epochs) or self.epochs < 1:
            raise BadInput(f"--epochs must be a positive integer, got {self.epochs!r}")
        if not _is_real(self.T) or not math.isfinite(self.T) or self.T <= 0:
            raise BadInput(f"the temperature -T must be a number > 0, got {self.T!r}")
        if self.alpha is not None:
            if not _is_real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
                raise BadInput(f"--alpha must be between 0 and 1, got {self.alpha!r}")
            if self.soft_only and self.alpha != 1:
                raise BadInput(f"--soft-only trains on teacher outputs alone (alpha = 1); "
                               f"--alpha {self.alpha:g} contradicts it")
        if not _is_real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise BadInput(f"--lr must be a positive number, got {self.lr!r}")
        if isinstance(self.optimizer, str):
            if self.optimizer.lower() not in OPTIMIZERS:
                raise BadInput(f"unknown optimizer {self.optimizer!r} (use {', '.join(OPTIMIZERS)})")
        elif isinstance(self.optimizer, torch.optim.Optimizer) or not callable(self.optimizer):
            raise BadInput("optimizer must be 'adam', 'adamw', 'sgd' or a callable f(params) -> "
                           "Optimizer (a ready optimizer would hold the wrong parameters)")
        if not _is_real(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise BadInput(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.scheduler is not None and self.scheduler != "cosine":
            raise BadInput(f"scheduler must be None or 'cosine', got {self.scheduler!r}")
        if not _is_real(self.feature_weight) or not math.isfinite(self.feature_weight) \
                or self.feature_weight < 0:
            raise BadInput(f"feature_weight must be a number >= 0, got {self.feature_weight!r}")
        if not _is_real(self.bias_tolerance) or not 0 <= self.bias_tolerance < 1:
            raise BadInput(f"bias_tolerance must be in [0, 1), got {self.bias_tolerance!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise BadInput(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.soft_only, bool):
            raise BadInput(f"soft_only must be True or False, got {self.soft_only!r}")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise BadInput(f"amp must be True, False or None, got {self.amp!r}")
        if self.cache_teacher is not None and not isinstance(self.cache_teacher, bool):
            raise BadInput(f"cache_teacher must be True, False or None (auto), got "
                           f"{self.cache_teacher!r}")
        pairs = self.feature_pairs()
        if pairs and not teachers:
            raise BadInput("--features needs a --teacher model (its layers are matched)")
        s_mods = dict(model.named_modules())
        t_mods = dict(teachers[0].named_modules()) if teachers else {}
        for s_name, t_name in pairs:
            _check_layer(s_name, s_mods, "student")
            _check_layer(t_name, t_mods, "teacher" if len(teachers) == 1 else "first teacher")
        if self.cache_teacher:
            why = _not_cacheable(self.loader, pairs)
            if why:
                raise BadInput(f"cannot cache the teacher outputs: {why}")
        if self.bias_adjust is not None and (not _is_int(self.bias_adjust) or self.bias_adjust < 0):
            raise BadInput(f"--bias-adjust takes a class index (an integer >= 0), got "
                           f"{self.bias_adjust!r}")

        # One small batch through the student and every teacher: shapes must agree.
        batch = peek_batch(self.loader)
        from .train import split_batch

        x, y = split_batch(batch)
        if y is None and self.effective_alpha < 1:
            raise BadInput("--data yields inputs only (no labels): use --soft-only (alpha = 1) to "
                           "train on the teacher's outputs alone")
        x = _head(x, 2)
        probe_student = model
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
            import copy

            probe_student = copy.deepcopy(model)      # a lazy module would initialise itself
        s_out, s_feats = _probe(probe_student, x, [s for s, _ in pairs], "student")
        if s_out.dim() < 2:
            raise BadInput(f"the student's output has shape {tuple(s_out.shape)}: distillation "
                           f"needs class scores (N, C)")
        if self.effective_alpha < 1 and isinstance(y, torch.Tensor) and y.numel() \
                and not y.is_floating_point():         # hard labels are trained on: classes
            lo, hi, c = int(y.min()), int(y.max()), s_out.shape[1]
            if lo < 0 or hi >= c:
                raise BadInput(f"--data has label {hi if hi >= c else lo}, but the student scores "
                               f"{c} classes (labels 0..{c - 1}); is it the data this model takes?")
        for i, t in enumerate(teachers):
            t_out, t_feats = _probe(t, x, [tn for _, tn in pairs] if i == 0 else [],
                                    "teacher" if len(teachers) == 1 else f"teacher {i + 1}")
            if t_out.shape[1:] != s_out.shape[1:]:
                who = "the teacher" if len(teachers) == 1 else f"teacher {i + 1}"
                raise BadInput(f"{who}'s output has shape {_shape(t_out)} but the student's has "
                               f"{_shape(s_out)}: they must score the same classes")
            if i == 0:
                for (s_name, t_name), sf, tf in zip(pairs, s_feats, t_feats):
                    _adapter_spec(s_name, t_name, sf.shape, tf.shape)     # raises if impossible
        if self.bias_adjust is not None:
            n_cls = s_out.shape[1]
            if self.bias_adjust >= n_cls:
                raise BadInput(f"--bias-adjust {self.bias_adjust}: the student scores {n_cls} "
                               f"classes (0..{n_cls - 1})")
            if _output_bias_layer(probe_student, x) is None:
                raise BadInput("--bias-adjust needs the student's class scores to come straight "
                               "from a Linear layer with a bias; none found")

    # --------------------------------------------------------------- the step
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        from .train import fit

        dev = ctx.device
        teachers = self.teacher_list()
        pairs = self.feature_pairs()
        if self.teacher_version is not None:
            teachers = teachers + [self._version_teacher(model, ctx)]
        T, alpha = float(self.T), self.effective_alpha
        notes: list[str] = []
        layers: list[dict] = []
        tables: dict = {}
        extra: dict = {"T": T, "alpha": alpha, "epochs": int(self.epochs),
                       "teachers": len(teachers)}

        with _borrowed(teachers, dev):
            # ---- the teacher signal: cached once, or computed batch by batch
            if self.cache_teacher is None:
                if _not_cacheable(self.loader, pairs):
                    use_cache = False
                else:
                    n_bytes = _cache_bytes(self.loader, teachers, dev)
                    use_cache = n_bytes is not None and n_bytes <= _AUTO_CACHE_LIMIT
            else:
                use_cache = bool(self.cache_teacher)
            labelled = _loader_labelled(self.loader)
            if use_cache:
                train_loader = _cached_loader(self.loader, teachers, T, dev, ctx.progress)
                notes.append("teacher outputs computed once and reused every epoch (the data is "
                             "a plain TensorDataset: no augmentation)")
            else:
                train_loader = self.loader
            extra["teacher_cached"] = use_cache

            # ---- feature adapters (trained with the student, dropped after)
            adapters = nn.ModuleList()
            s_mods = dict(model.named_modules())
            t_mods = dict(teachers[0].named_modules())
            if pairs:
                from .train import split_batch, to_device

                x0, _ = split_batch(peek_batch(self.loader))
                x0 = to_device(_head(x0, 2), dev)
                _, sf = _probe(model, x0, [s for s, _ in pairs], "student")
                _, tf = _probe(teachers[0], x0, [t for _, t in pairs], "teacher")
                with _seeded(self.seed):
                    for (s_name, t_name), a, b in zip(pairs, sf, tf):
                        adapters.append(_make_adapter(_adapter_spec(s_name, t_name, a.shape, b.shape)))
                adapters.to(dev)
                adapters.train()

            masks = _sparsity_masks(model) if self.keep_sparsity else {}
            if masks:
                notes.append(f"kept the zeros of {len(masks)} sparse weight tensor(s) (pruned "
                             f"weights stay pruned)")

            feature_sum = torch.zeros((), dtype=torch.float64, device=dev)
            feature_steps = [0]

            def loss_fn(student: nn.Module, batch: Any) -> torch.Tensor:
                if use_cache:
                    x, p = batch[0], batch[-1]
                    y = batch[1] if labelled else None
                    teacher_sig, is_probs = p, True
                else:
                    from .train import split_batch

                    x, y = split_batch(batch)
                    with _capture(t_mods, [t for _, t in pairs]) as t_store:
                        teacher_sig = _teacher_signal(teachers, x, T)
                    is_probs = len(teachers) > 1
                    t_feats = [t_store[t] for _, t in pairs]
                with _capture(s_mods, [s for s, _ in pairs]) as s_store:
                    s_logits = _scores(forward_batch(student, x))
                loss = distillation_loss(s_logits, teacher_sig, y if alpha < 1 else None, T,
                                         alpha, teacher_is_probs=is_probs)
                if pairs:
                    f_loss = sum(F.mse_loss(ad(s_store[s].float()).float(), tf.float())
                                 for ad, (s, _), tf in zip(adapters, pairs, t_feats))
                    feature_sum.add_(f_loss.detach().double())
                    feature_steps[0] += 1
                    loss = loss + self.feature_weight * f_loss
                return loss

            def after_step(student: nn.Module) -> None:
                for p, zero in masks.items():
                    p.masked_fill_(zero, 0.0)   # +0.0: p * 0 would leave -0.0, which packs as a value

            params = [p for p in model.parameters() if p.requires_grad] + list(adapters.parameters())
            with torch.enable_grad():       # training works whatever the caller's grad mode
                records = fit(model, train_loader, epochs=int(self.epochs), lr=float(self.lr),
                              optimizer=self.optimizer, weight_decay=float(self.weight_decay),
                              loss_fn=loss_fn, params=params, device=dev, amp=self.amp,
                              progress=ctx.progress, desc="distill",
                              after_step=after_step if masks else None,
                              scheduler=self.scheduler, seed=self.seed)
            tables["epochs"] = pd.DataFrame([{"epoch": r["epoch"], "loss": r["loss"]}
                                             for r in records])
            extra["final_loss"] = records[-1]["loss"]
            for (s_name, t_name), ad in zip(pairs, adapters):
                layers.append({"name": s_name, "kind": "feature hint", "teacher_layer": t_name,
                               "adapter": _describe_adapter(ad),
                               "adapter_params": sum(p.numel() for p in ad.parameters())})
            if pairs and feature_steps[0]:
                extra["feature_mse_mean"] = feature_sum.item() / feature_steps[0]
                notes.append(f"{len(pairs)} feature adapter(s) trained with the student and "
                             f"dropped after ({sum(r['adapter_params'] for r in layers):,} "
                             f"parameters, not part of the result)")
            del adapters

            # ---- per-class accuracy and the bias adjustment
            evaluator = ctx.evaluator if isinstance(ctx.evaluator, DataLoader) else None
            per_class = {}
            if evaluator is not None:
                per_class["teacher" if len(teachers) == 1 else f"teachers ({len(teachers)}, averaged)"] = \
                    _per_class(lambda x: _teacher_signal(teachers, x, 1.0), evaluator, dev)
                per_class["student"] = _per_class(_model_fn(model), evaluator, dev)
            if self.bias_adjust is not None:
                c = int(self.bias_adjust)
                info = self._adjust_bias(model, teachers, c, dev, labelled)
                extra.update({"bias_class": c, "bias_raise": info["raise"],
                              "transfer_accuracy_other_classes": info["acc_before"],
                              "transfer_accuracy_other_classes_adjusted": info["acc_after"]})
                layers.append({"name": info["layer"], "kind": "bias adjust", "class": c,
                               "raise": info["raise"]})
                notes.append(f"raised the bias of class {c} in {info['layer']} by "
                             f"{info['raise']:.3f}: the largest raise keeping accuracy on the "
                             f"other classes' transfer data ({info['n']:,} examples, labels from "
                             f"{info['ref']}) within {100 * self.bias_tolerance:g} points "
                             f"({100 * info['acc_before']:.2f}% -> {100 * info['acc_after']:.2f}%)")
                if evaluator is not None:
                    per_class[f"student (bias +{info['raise']:.2f})"] = \
                        _per_class(_model_fn(model), evaluator, dev)
            if per_class:
                tables["per_class"] = _per_class_table(per_class)
                by_class = tables["per_class"].set_index("class")
                if self.bias_adjust is not None and int(self.bias_adjust) in by_class.index:
                    row = by_class.loc[int(self.bias_adjust)]
                    extra["class_accuracy_unadjusted"] = float(row["student"])
                    extra["class_accuracy_adjusted"] = float(row.iloc[-1])

        notes.insert(0, f"distilled for {self.epochs} epoch(s) from "
                        f"{'1 teacher' if len(teachers) == 1 else f'{len(teachers)} teachers (softened probabilities averaged)'}"
                        f" at T={T:g}, alpha={alpha:g}"
                        + (" (soft targets only)" if alpha == 1 else ""))
        compare = ({"teacher": teachers[0]} if len(teachers) == 1 else
                   {f"teacher {i + 1}": t for i, t in enumerate(teachers)})
        return CompressionResult(model=model, layers=layers, notes=notes, extra=extra,
                                 tables=tables, compare=compare)

    def _version_teacher(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        h, k = ctx.history, self.teacher_version
        if h is None:
            raise BadInput("teacher_version needs the step to run through a History (a magic or "
                           "History.apply): a plain compress() call has no earlier versions")
        if k >= len(h.versions):
            raise BadInput(f"teacher_version {k}: {h.name} has versions 0..{len(h.versions) - 1}")
        if k == h.pos:
            raise BadInput(f"teacher_version {k} is {h.name}'s current version, the student "
                           f"itself: pick an earlier version (0..{h.pos - 1})" if h.pos else
                           f"teacher_version {k} is {h.name}'s current version, the student "
                           f"itself: {h.name} has no earlier version yet")
        teacher = h.version_model(k)
        from .train import split_batch

        x, _ = split_batch(peek_batch(self.loader))
        t_out, _ = _probe(teacher, _head(x, 2), [], f"version {k}")
        s_out, _ = _probe(model, _head(x, 2), [], "student")
        if t_out.shape[1:] != s_out.shape[1:]:
            raise BadInput(f"version {k}'s output has shape {_shape(t_out)} but the student's has "
                           f"{_shape(s_out)}: they must score the same classes")
        return teacher

    def _adjust_bias(self, model, teachers, c, dev, labelled) -> dict:
        from .train import split_batch, to_device

        with _eval_mode(model), torch.no_grad():
            x0, _ = split_batch(peek_batch(self.loader))
            layer_name, layer = _output_bias_layer(model, to_device(_head(x0, 2), dev))
            logits, refs = [], []
            for batch in self.loader:
                x, y = split_batch(to_device(batch, dev))
                s = _scores(model(x)).float()
                if labelled and y is not None:
                    ref = y.argmax(1) if y.dim() == 2 else y
                else:
                    ref = _teacher_signal(teachers, x, 1.0).argmax(1)
                logits.append(s)
                refs.append(ref)
            logits, refs = torch.cat(logits), torch.cat(refs)
            b, acc0, acc1, n = choose_bias_raise(logits, refs, c, self.bias_tolerance)
            layer.bias[c] += b
        return {"raise": b, "acc_before": acc0, "acc_after": acc1, "n": n, "layer": layer_name,
                "ref": "the labels" if labelled else "the teacher's predictions"}


# ------------------------------------------------------------------ the teacher is not the student

def _storage_keys(model: nn.Module) -> dict:
    """{(device, storage address): parameter name} of the model's parameters (a tied or viewed
    tensor shares its storage, so it is found even when it is not the same Parameter object)."""
    keys = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        try:
            ptr = p.untyped_storage().data_ptr()
        except Exception:  # noqa: BLE001 - uninitialised / meta tensors have no storage
            continue
        if ptr:
            keys.setdefault((str(p.device), ptr), name)
    return keys


def shared_parameters(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names (in ``teacher``) of the teacher's parameters that are also the student's: the same
    tensor object or the same storage. Empty when the two models are separate."""
    s_ids = {id(p) for p in student.parameters()}
    s_keys = _storage_keys(student)
    shared = []
    for key, name in _storage_keys(teacher).items():
        if key in s_keys:
            shared.append(name)
    for name, p in teacher.named_parameters():
        if id(p) in s_ids and name not in shared:
            shared.append(name)
    return shared


def check_teachers_apart(student: nn.Module, teachers: list, student_name: str | None = None,
                         teacher_names: list[str] | None = None,
                         earlier: str | None = None) -> None:
    """Refuse (one-line :class:`BadInput`) a teacher that is the student itself, or that shares
    parameter tensors with it: the student would be distilled from itself. ``student_name``,
    ``teacher_names`` (the notebook names, from the magic) and ``earlier`` (how to name an earlier
    version of the student) only make the message clearer."""
    s = student_name or "the student"
    for i, t in enumerate(teachers):
        if not isinstance(t, nn.Module):
            continue
        tname = teacher_names[i] if teacher_names and i < len(teacher_names) else None
        who = f"the teacher {tname}" if tname else \
            ("the teacher" if len(teachers) == 1 else f"teacher {i + 1}")
        if t is student:
            where = f" ({tname})" if tname else ""
            earlier = earlier or ("teacher_version=0 through a History: the model as first "
                                  "registered")
            raise BadInput(f"the teacher is the student itself{where}: distil from another model, "
                           f"or from an earlier version of it ({earlier})")
        shared = shared_parameters(student, t)
        if shared:
            n = len(shared)
            raise BadInput(f"{who} shares {n} parameter tensor{'s' if n != 1 else ''} with {s} "
                           f"(e.g. {shared[0]}): a teacher must be a separate model; distil from "
                           f"another model or from a copy (copy.deepcopy)")


# ------------------------------------------------------------------------- the public verb

def distill(student: nn.Module, teachers: Any, loader: DataLoader, *, evaluator: Any = None,
            device: Any = None, **options) -> nn.Module:
    """Train a copy of ``student`` from ``teachers`` on ``loader``; returns the trained student
    (the argument itself is not changed). ``options`` are :class:`DistillConfig` fields
    (``epochs``, ``T``, ``alpha``, ``soft_only``, ``features``, ``bias_adjust``, ...)."""
    DistillConfig.check_options(options, "distill", exclude={"teachers", "loader", "device"})
    config = DistillConfig(teachers=teachers, loader=loader, device=device, **options)
    return compress(student, config, evaluator=evaluator, device=device).model


def choose_bias_raise(logits: torch.Tensor, refs: torch.Tensor, cls: int,
                      tolerance: float = 0.005) -> tuple[float, float, float, int]:
    """The largest raise ``b`` of class ``cls``'s score that keeps top-1 accuracy on the examples
    whose reference label is *not* ``cls`` within ``tolerance`` of its value at ``b = 0``.

    Examples of ``cls`` are dropped first, so the choice never uses that class. Raising one
    class's score can only turn predictions into ``cls`` (always wrong here), so accuracy falls
    monotonically with ``b`` and the answer is exact: a correct example flips once ``b`` passes
    its margin ``max_other - score_cls``; we allow ``floor(tolerance * n)`` flips.
    Returns ``(b, accuracy_before, accuracy_after, n)``.
    """
    keep = refs != cls
    s, r = logits[keep].float(), refs[keep]
    n = int(r.numel())
    if n == 0:
        return 0.0, float("nan"), float("nan"), 0
    pred = s.argmax(1)
    correct = pred == r
    acc0 = correct.float().mean().item()
    others = s.clone()
    others[:, cls] = -float("inf")
    margin = (others.max(1).values - s[:, cls])[correct]
    k = int(math.floor(tolerance * n + 1e-9))
    if margin.numel() == 0:
        b = 0.0
    else:
        m = torch.sort(margin).values
        if k >= m.numel():
            b = float(m[-1].item())           # every correct example may flip: stop at the last
        else:
            edge = float(m[k].item())
            b = max(0.0, edge - 1e-4 * max(1.0, abs(edge)))
    adj = s.clone()
    adj[:, cls] += b
    acc1 = (adj.argmax(1) == r).float().mean().item()
    return b, acc0, acc1, n


# ------------------------------------------------------------------------------- the helpers

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _shape(t: torch.Tensor) -> str:
    return "(N, " + ", ".join(str(s) for s in t.shape[1:]) + ")"


def _head(x: Any, n: int) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > n:
        return x[:n]
    return x


def _scores(out: Any) -> torch.Tensor:
    from .train import _logits

    return _logits(out)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def peek_batch(loader: DataLoader, what: str = "the transfer data (--data)") -> Any:
    """The loader's first batch, its shuffling order left alone (:func:`nbcompress.train.peek_batch`)."""
    from .train import peek_batch as peek

    return peek(loader, what)


def _check_layer(name: str, modules: dict, who: str) -> None:
    if name in modules and name != "":
        return
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"its layers: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}")
    raise BadInput(f"--features: the {who} has no layer named {name!r}; {hint}")


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Eval mode for the duration, then every submodule's own train/eval flag restored."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextlib.contextmanager
def _borrowed(teachers: list[nn.Module], device: torch.device):
    """The teachers on ``device`` in eval mode; afterwards back on their own devices, with their
    own train/eval flags (also after an exception or Ctrl-C)."""
    homes = []
    seen = set()
    for t in teachers:
        if id(t) in seen:
            continue
        seen.add(id(t))
        homes.append((t, model_device(t)))
    moved = []
    try:
        with _eval_mode(*[t for t, _ in homes]):
            for t, home in homes:
                if home != device:
                    moved.append((t, home))
                    t.to(device)
            yield
    finally:
        for t, home in moved:
            t.to(home)


@contextlib.contextmanager
def _capture(modules: dict, names: list[str]):
    """Record the output of the named submodules on each forward: ``store[name]``."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(mod, inp, out):
            t = _first_tensor(out)
            if t is None:
                raise BadInput(f"--features: layer {name!r} returned a {type(out).__name__}, "
                               f"not a tensor")
            store[name] = t
        return fn

    try:
        for n in dict.fromkeys(names):
            handles.append(modules[n].register_forward_hook(hook(n)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _probe(model: nn.Module, x: Any, layer_names: list[str], who: str):
    """Run ``model`` once on ``x`` (on the model's device, eval mode, no grad): (scores, [features])."""
    from .train import to_device

    dev = model_device(model)
    mods = dict(model.named_modules())
    try:
        with _eval_mode(model), torch.no_grad(), _capture(mods, layer_names) as store:
            xin = to_device(x, dev)
            out = _scores(model(**xin) if isinstance(xin, dict) else model(xin))
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run is a one-line user error here
        msg = str(e).splitlines()[0] if str(e) else ""
        raise BadInput(f"the {who} could not run on a batch of --data: {type(e).__name__}: {msg}") from None
    return out, [store[n] for n in layer_names]


def _adapter_spec(s_name: str, t_name: str, s_shape, t_shape) -> tuple:
    s_shape, t_shape = tuple(s_shape), tuple(t_shape)
    if len(s_shape) == 4 and len(t_shape) == 4:
        return ("conv", s_shape[1], t_shape[1], t_shape[2:])
    if len(s_shape) == len(t_shape) and len(s_shape) >= 2 and s_shape[1:-1] == t_shape[1:-1]:
        return ("linear", s_shape[-1], t_shape[-1], None)
    s_n, t_n = math.prod(s_shape[1:]), math.prod(t_shape[1:])
    if s_n * t_n > 50_000_000:
        raise BadInput(f"--features {s_name}:{t_name}: the outputs (N, {', '.join(map(str, s_shape[1:]))}) "
                       f"and (N, {', '.join(map(str, t_shape[1:]))}) would need a "
                       f"{s_n:,}x{t_n:,} adapter; pick layers whose outputs match better")
    return ("flat", s_n, t_n, t_shape[1:])


class _ConvAdapter(nn.Module):
    def __init__(self, c_in: int, c_out: int, size: tuple):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 1)
        self.size = tuple(size)

    def forward(self, x):
        y = self.proj(x)
        if tuple(y.shape[2:]) != self.size:
            if y.shape[2] >= self.size[0] and y.shape[3] >= self.size[1]:
                y = F.adaptive_avg_pool2d(y, self.size)
            else:
                y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y


class _FlatAdapter(nn.Module):
    def __init__(self, n_in: int, n_out: int, out_shape: tuple):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)
        self.out_shape = tuple(out_shape)

    def forward(self, x):
        return self.proj(x.flatten(1)).reshape((x.shape[0],) + self.out_shape)


def _make_adapter(spec: tuple) -> nn.Module:
    kind, a, b, size = spec
    if kind == "conv":
        return _ConvAdapter(a, b, size)
    if kind == "linear":
        return nn.Linear(a, b)
    return _FlatAdapter(a, b, size)


def _describe_adapter(ad: nn.Module) -> str:
    if isinstance(ad, _ConvAdapter):
        return f"1x1 conv {ad.proj.in_channels}->{ad.proj.out_channels}"
    if isinstance(ad, _FlatAdapter):
        return f"linear (flattened) {ad.proj.in_features}->{ad.proj.out_features}"
    return f"linear {ad.in_features}->{ad.out_features}"


def _teacher_signal(teachers: list[nn.Module], x: Any, T: float) -> torch.Tensor:
    """One teacher: its logits. Several: the mean of their ``softmax(logits / T)``."""
    with torch.no_grad():
        outs = [_scores(forward_batch(t, x)).float() for t in teachers]
        if len(outs) == 1:
            return outs[0]
        return torch.stack([F.softmax(o / T, dim=1) for o in outs]).mean(0)


def _loader_labelled(loader: DataLoader) -> bool:
    from .train import split_batch

    return split_batch(peek_batch(loader))[1] is not None


def _not_cacheable(loader: DataLoader, pairs: list) -> str | None:
    if pairs:
        return "--features needs the teacher to run on every batch"
    ds = getattr(loader, "dataset", None)
    if type(ds) is not TensorDataset:
        return ("the loader's dataset is not a plain TensorDataset (it may augment or change "
                "between epochs)")
    if loader.collate_fn is not torch.utils.data.default_collate:
        return "the loader has its own collate_fn"
    if loader.batch_sampler is None:
        return "the loader has no batch sampler"
    return None


def _cache_bytes(loader: DataLoader, teachers, dev) -> int | None:
    ds = getattr(loader, "dataset", None)
    if type(ds) is not TensorDataset:
        return None
    try:
        n = len(ds)
    except TypeError:
        return None
    # class count from the first teacher on one example
    x = ds.tensors[0][:1]
    out, _ = _probe(teachers[0], x, [], "teacher")
    return n * math.prod(out.shape[1:]) * 4


def _cached_loader(loader: DataLoader, teachers, T: float, dev, progress: bool) -> DataLoader:
    """A loader over the same tensors plus the teachers' softened probabilities, drawing its
    batches from the *same* batch sampler (so the same shuffling order as ``loader``)."""
    from tqdm.auto import tqdm

    from .train import to_device

    ds = loader.dataset
    x_all = ds.tensors[0]
    chunk = max(256, loader.batch_size or 256)
    probs = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x_all), chunk), desc="teacher outputs", leave=False,
                      disable=not progress):
            x = to_device(x_all[i:i + chunk], dev)
            outs = [_scores(t(x)).float() for t in teachers]
            probs.append(torch.stack([F.softmax(o / T, dim=1) for o in outs]).mean(0).cpu())
    p = torch.cat(probs)
    tensors = (ds.tensors[0], ds.tensors[1], p) if len(ds.tensors) >= 2 else (ds.tensors[0], p)
    # The same batch sampler and the same generator: each epoch draws from ``loader.generator``
    # exactly what iterating ``loader`` would (its iterator's base seed, then the permutation).
    return DataLoader(TensorDataset(*tensors), batch_sampler=loader.batch_sampler, num_workers=0,
                      pin_memory=loader.pin_memory, generator=loader.generator)


def _sparsity_masks(model: nn.Module, min_zero_fraction: float = 0.01) -> dict:
    """{weight: bool mask of its zeros} for the weights that are already sparse (pruned)."""
    masks = {}
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dim() >= 2:
            zeros = (p == 0)
            if zeros.float().mean().item() >= min_zero_fraction:
                masks[p] = zeros
    return masks


def _output_bias_layer(model: nn.Module, x: Any):
    """(name, module) of the layer whose output *is* the model's class scores and that has a
    bias: the one a class-bias adjustment changes. None if there is none."""
    from .train import to_device

    cands = {n: m for n, m in model.named_modules()
             if isinstance(getattr(m, "bias", None), torch.Tensor) and m.bias.dim() == 1
             and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Bilinear))}
    outs: dict[str, torch.Tensor] = {}
    with _eval_mode(model), torch.no_grad(), _capture(cands, list(cands)) as store:
        scores = _scores(model(to_device(x, model_device(model))))
        outs = dict(store)
    for n, t in outs.items():
        if t is scores and cands[n].bias.shape[0] == scores.shape[1]:
            return n, cands[n]
    return None


def _model_fn(model: nn.Module):
    def fn(x):
        with _eval_mode(model), torch.no_grad():
            return _scores(model(x))
    return fn


def _per_class(fn, loader: DataLoader, dev) -> dict[int, tuple[int, int]]:
    """{class: (correct, count)} of ``fn(x) -> scores`` on a labelled loader."""
    from .train import split_batch, to_device

    correct: dict[int, int] = {}
    count: dict[int, int] = {}
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(to_device(batch, dev))
            if y is None:
                return {}
            if y.dim() == 2:
                y = y.argmax(1)
            pred = fn(x).argmax(1)
            for c in torch.unique(y).tolist():
                sel = y == c
                count[c] = count.get(c, 0) + int(sel.sum().item())
                correct[c] = correct.get(c, 0) + int((pred[sel] == c).sum().item())
    return {c: (correct[c], count[c]) for c in sorted(count)}


def _per_class_table(columns: dict[str, dict]) -> pd.DataFrame:
    """One row a class: its test count and each model's accuracy (fraction) on it."""
    first = next(iter(columns.values()))
    rows = []
    for c in sorted(first):
        row = {"class": c, "n": first[c][1]}
        for label, d in columns.items():
            ok, n = d.get(c, (0, 0))
            row[label] = ok / n if n else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- the demo

def demo_config(train_loader: DataLoader, test_loader: DataLoader):
    """The terminal demo's step: distil the model (whatever the earlier steps made of it) from its
    own first version, the trained uncompressed LeNet, for 2 epochs; pruned zeros stay zero.
    A fine-tune of a trained model, hence the small learning rate (Adam at 1e-3 first knocks a
    trained network about). It needs trainable float weights, so it belongs before any integer
    quantization step."""
    return ("distill from the uncompressed original (version 0), 2 epochs, T=4, alpha=0.9",
            DistillConfig(teacher_version=0, loader=train_loader, epochs=2, T=4.0, alpha=0.9,
                          lr=3e-4))
