"""The distillation run: the teachers borrowed (work device, eval mode, given back as they were),
their outputs cached when the data cannot change between epochs, feature adapters trained with
the student, pruned zeros kept, then the optional class-bias raise and per-class table.

Teacher outputs are cached automatically (``cache_teacher=None``) when the loader's dataset is a
plain ``TensorDataset`` (no augmentation possible) with the default collate, there are no feature
hints, and the cache fits in 256 MiB; the data order is the loader's own either way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ...batches import forward_batch, logits_of, split_batch, to_device
from ...core import BadInput, CompressionResult, FieldError, StepContext, model_device
from ...tokens import is_token_task
from ...train import fit
from .adapters import adapter_spec, describe_adapter, make_adapter
from .bias import adjust_bias, model_fn, per_class, per_class_table
from .losses import distillation_loss, token_distillation_loss
from .probe import capture, eval_mode, head, peek_batch, probe, shape_text, teacher_signal
from .students import seeded

__all__ = ["run_distill", "not_cacheable"]

_AUTO_CACHE_LIMIT = 256 << 20      # bytes of cached teacher probabilities we keep without asking


@contextlib.contextmanager
def borrowed(teachers: list[nn.Module], device: torch.device):
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
        with eval_mode(*[t for t, _ in homes]):
            for t, home in homes:
                if home != device:
                    moved.append((t, home))
                    t.to(device)
            yield
    finally:
        for t, home in moved:
            t.to(home)


def loader_labelled(loader: DataLoader) -> bool:
    return split_batch(peek_batch(loader))[1] is not None


def not_cacheable(loader: DataLoader, pairs: list) -> str | None:
    """Why the teacher outputs cannot be computed once (a FieldError template), or None."""
    if pairs:
        return "{features} needs the teacher to run on every batch"
    ds = getattr(loader, "dataset", None)
    if type(ds) is not TensorDataset:
        return ("the loader's dataset is not a plain TensorDataset (it may augment or change "
                "between epochs)")
    if loader.collate_fn is not torch.utils.data.default_collate:
        return "the loader has its own collate_fn"
    if loader.batch_sampler is None:
        return "the loader has no batch sampler"
    return None


def _cache_bytes(loader: DataLoader, teachers) -> int | None:
    ds = getattr(loader, "dataset", None)
    if type(ds) is not TensorDataset:
        return None
    try:
        n = len(ds)
    except TypeError:
        return None
    # class count from the first teacher on one example
    x = ds.tensors[0][:1]
    out, _ = probe(teachers[0], x, [], "teacher")
    return n * math.prod(out.shape[1:]) * 4


def _cached_loader(loader: DataLoader, teachers, T: float, dev, progress: bool) -> DataLoader:
    """A loader over the same tensors plus the teachers' softened probabilities, drawing its
    batches from the *same* batch sampler (so the same shuffling order as ``loader``)."""
    from tqdm.auto import tqdm

    ds = loader.dataset
    x_all = ds.tensors[0]
    chunk = max(256, loader.batch_size or 256)
    probs = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x_all), chunk), desc="teacher outputs", leave=False,
                      disable=not progress):
            x = to_device(x_all[i:i + chunk], dev)
            outs = [logits_of(t(x)).float() for t in teachers]
            probs.append(torch.stack([F.softmax(o / T, dim=1) for o in outs]).mean(0).cpu())
    p = torch.cat(probs)
    tensors = (ds.tensors[0], ds.tensors[1], p) if len(ds.tensors) >= 2 else (ds.tensors[0], p)
    # The same batch sampler and the same generator: each epoch draws from ``loader.generator``
    # exactly what iterating ``loader`` would (its iterator's base seed, then the permutation).
    return DataLoader(TensorDataset(*tensors), batch_sampler=loader.batch_sampler, num_workers=0,
                      pin_memory=loader.pin_memory, generator=loader.generator)


def sparsity_masks(model: nn.Module, min_zero_fraction: float = 0.01) -> dict:
    """{weight: bool mask of its zeros} for the weights that are already sparse (pruned)."""
    masks = {}
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dim() >= 2:
            zeros = (p == 0)
            if zeros.float().mean().item() >= min_zero_fraction:
                masks[p] = zeros
    return masks


def version_teacher(cfg, model: nn.Module, ctx: StepContext) -> nn.Module:
    """Version ``cfg.teacher_version`` of the history the step runs through, checked against the
    student."""
    h, k = ctx.history, cfg.teacher_version
    if h is None:
        raise FieldError("{teacher_version} needs the step to run through a History (a magic or "
                         "History.apply): a plain compress() call has no earlier versions")
    if k >= len(h.versions):
        raise FieldError(f"{{teacher_version}} {k}: {h.name} has versions "
                         f"0..{len(h.versions) - 1}")
    if k == h.pos:
        raise FieldError(f"{{teacher_version}} {k} is {h.name}'s current version, the student "
                         f"itself: pick an earlier version (0..{h.pos - 1})" if h.pos else
                         f"{{teacher_version}} {k} is {h.name}'s current version, the student "
                         f"itself: {h.name} has no earlier version yet")
    teacher = h.version_model(k)
    x, _ = split_batch(peek_batch(cfg.loader))
    t_out, _ = probe(teacher, head(x, 2), [], f"version {k}")
    s_out, _ = probe(model, head(x, 2), [], "student")
    if t_out.shape[1:] != s_out.shape[1:]:
        raise BadInput(f"version {k}'s output has shape {shape_text(t_out)} but the student's has "
                       f"{shape_text(s_out)}: they must score the same classes")
    return teacher


def run_distill(cfg, model: nn.Module, ctx: StepContext) -> CompressionResult:
    """Train ``model`` (the student, in place) as :class:`DistillConfig` ``cfg`` says."""
    dev = ctx.device
    teachers = cfg.teacher_list()
    pairs = cfg.feature_pairs()
    if cfg.teacher_version is not None:
        teachers = teachers + [version_teacher(cfg, model, ctx)]
    T, alpha = float(cfg.T), cfg.effective_alpha
    notes: list[str] = []
    layers: list[dict] = []
    tables: dict = {}
    extra: dict = {"T": T, "alpha": alpha, "epochs": int(cfg.epochs), "teachers": len(teachers)}

    with borrowed(teachers, dev):
        # ---- a language model ([batch, seq, vocab] scores): distilled token by token
        x0, y0 = split_batch(peek_batch(cfg.loader))
        s0, _ = probe(model, head(x0, 2), [], "student")
        tokens = is_token_task(s0, head(x0, 2), head(y0, 2) if y0 is not None else None)
        extra["tokens"] = tokens
        # ---- the teacher signal: cached once, or computed batch by batch
        if tokens:          # a [batch, seq, vocab] tensor a batch: too big to keep
            use_cache = False
        elif cfg.cache_teacher is None:
            if not_cacheable(cfg.loader, pairs):
                use_cache = False
            else:
                n_bytes = _cache_bytes(cfg.loader, teachers)
                use_cache = n_bytes is not None and n_bytes <= _AUTO_CACHE_LIMIT
        else:
            use_cache = bool(cfg.cache_teacher)
        labelled = loader_labelled(cfg.loader)
        if use_cache:
            train_loader = _cached_loader(cfg.loader, teachers, T, dev, ctx.progress)
            notes.append("teacher outputs computed once and reused every epoch (the data is "
                         "a plain TensorDataset: no augmentation)")
        else:
            train_loader = cfg.loader
        extra["teacher_cached"] = use_cache

        # ---- feature adapters (trained with the student, dropped after)
        adapters = nn.ModuleList()
        s_mods = dict(model.named_modules())
        t_mods = dict(teachers[0].named_modules())
        if pairs:
            x0 = to_device(head(x0, 2), dev)
            _, sf = probe(model, x0, [s for s, _ in pairs], "student")
            _, tf = probe(teachers[0], x0, [t for _, t in pairs], "teacher")
            with seeded(cfg.seed):
                for (s_name, t_name), a, b in zip(pairs, sf, tf):
                    adapters.append(make_adapter(adapter_spec(s_name, t_name, a.shape, b.shape)))
            adapters.to(dev)
            adapters.train()

        masks = sparsity_masks(model) if cfg.keep_sparsity else {}
        if masks:
            notes.append(f"kept the zeros of {len(masks)} sparse weight tensor(s) (pruned "
                         f"weights stay pruned)")

        feature_sum = torch.zeros((), dtype=torch.float64, device=dev)
        feature_steps = torch.zeros((), dtype=torch.long)   # tensors: fit carries them back
                                                            # from its workers (processes=N)

        def loss_fn(student: nn.Module, batch: Any) -> torch.Tensor:
            if use_cache:
                x, p = batch[0], batch[-1]
                y = batch[1] if labelled else None
                teacher_sig, is_probs = p, True
            else:
                x, y = split_batch(batch)
                with capture(t_mods, [t for _, t in pairs]) as t_store:
                    teacher_sig = teacher_signal(teachers, x, T, dim=-1 if tokens else 1)
                is_probs = len(teachers) > 1
                t_feats = [t_store[t] for _, t in pairs]
            with capture(s_mods, [s for s, _ in pairs]) as s_store:
                s_logits = logits_of(forward_batch(student, x))
            if tokens:
                loss = token_distillation_loss(s_logits, teacher_sig, x, y, T, alpha,
                                               teacher_is_probs=is_probs)
            else:
                loss = distillation_loss(s_logits, teacher_sig, y if alpha < 1 else None, T,
                                         alpha, teacher_is_probs=is_probs)
            if pairs:
                f_loss = sum(F.mse_loss(ad(s_store[s].float()).float(), tf.float())
                             for ad, (s, _), tf in zip(adapters, pairs, t_feats))
                feature_sum.add_(f_loss.detach().double())
                feature_steps.add_(1)
                loss = loss + cfg.feature_weight * f_loss
            return loss

        def after_step(student: nn.Module) -> None:
            for p, zero in masks.items():
                p.masked_fill_(zero, 0.0)   # +0.0: p * 0 would leave -0.0, which packs as a value

        params = [p for p in model.parameters() if p.requires_grad] + list(adapters.parameters())
        with torch.enable_grad():       # training works whatever the caller's grad mode
            records = fit(model, train_loader, epochs=int(cfg.epochs), lr=float(cfg.lr),
                          optimizer=cfg.optimizer, weight_decay=float(cfg.weight_decay),
                          loss_fn=loss_fn, params=params, device=dev, amp=cfg.amp,
                          progress=ctx.progress, desc="distill",
                          after_step=after_step if masks else None,
                          scheduler=cfg.scheduler, seed=cfg.seed,
                          carry=(feature_sum, feature_steps))
        tables["epochs"] = pd.DataFrame([{"epoch": r["epoch"], "loss": r["loss"]}
                                         for r in records])
        extra["final_loss"] = records[-1]["loss"]
        for (s_name, t_name), ad in zip(pairs, adapters):
            layers.append({"name": s_name, "kind": "feature hint", "teacher_layer": t_name,
                           "adapter": describe_adapter(ad),
                           "adapter_params": sum(p.numel() for p in ad.parameters())})
        if pairs and int(feature_steps):
            extra["feature_mse_mean"] = feature_sum.item() / int(feature_steps)
            notes.append(f"{len(pairs)} feature adapter(s) trained with the student and "
                         f"dropped after ({sum(r['adapter_params'] for r in layers):,} "
                         f"parameters, not part of the result)")
        adapters = None             # dropped: not part of the result
        if not tokens:      # per class: a classifier's table
            _bias_and_per_class(cfg, model, teachers, ctx, labelled, layers, notes, tables, extra)

    n_t = len(teachers)
    notes.insert(0, f"distilled for {cfg.epochs} epoch(s) from "
                    f"{'1 teacher' if n_t == 1 else f'{n_t} teachers (softened probabilities averaged)'}"
                    f" at T={T:g}, alpha={alpha:g}"
                    + (" (soft targets only)" if alpha == 1 else "")
                    + (", token by token (a language model)" if tokens else ""))
    compare = ({"teacher": teachers[0]} if n_t == 1 else
               {f"teacher {i + 1}": t for i, t in enumerate(teachers)})
    return CompressionResult(model=model, layers=layers, notes=notes, extra=extra,
                             tables=tables, compare=compare)


def _bias_and_per_class(cfg, model, teachers, ctx, labelled, layers, notes, tables, extra):
    """The class-bias raise (``bias_adjust``) and the per-class table (a DataLoader evaluator)."""
    dev = ctx.device
    evaluator = ctx.evaluator if isinstance(ctx.evaluator, DataLoader) else None
    columns = {}
    if evaluator is not None:
        label = "teacher" if len(teachers) == 1 else f"teachers ({len(teachers)}, averaged)"
        columns[label] = per_class(lambda x: teacher_signal(teachers, x, 1.0), evaluator, dev)
        columns["student"] = per_class(model_fn(model), evaluator, dev)
    if cfg.bias_adjust is not None:
        c = int(cfg.bias_adjust)
        info = adjust_bias(model, cfg.loader, teachers, c, cfg.bias_tolerance, dev, labelled)
        extra.update({"bias_class": c, "bias_raise": info["raise"],
                      "transfer_accuracy_other_classes": info["acc_before"],
                      "transfer_accuracy_other_classes_adjusted": info["acc_after"]})
        layers.append({"name": info["layer"], "kind": "bias adjust", "class": c,
                       "raise": info["raise"]})
        notes.append(f"raised the bias of class {c} in {info['layer']} by "
                     f"{info['raise']:.3f}: the largest raise keeping accuracy on the "
                     f"other classes' transfer data ({info['n']:,} examples, labels from "
                     f"{info['ref']}) within {100 * cfg.bias_tolerance:g} points "
                     f"({100 * info['acc_before']:.2f}% -> {100 * info['acc_after']:.2f}%)")
        if evaluator is not None:
            columns[f"student (bias +{info['raise']:.2f})"] = \
                per_class(model_fn(model), evaluator, dev)
    if columns:
        tables["per_class"] = per_class_table(columns)
        by_class = tables["per_class"].set_index("class")
        if cfg.bias_adjust is not None and int(cfg.bias_adjust) in by_class.index:
            row = by_class.loc[int(cfg.bias_adjust)]
            extra["class_accuracy_unadjusted"] = float(row["student"])
            extra["class_accuracy_adjusted"] = float(row.iloc[-1])
