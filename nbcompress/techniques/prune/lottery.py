"""Lottery tickets: iterative magnitude pruning with rewinding to the initial weights (Frankle &
Carbin 2019), the ticket compared with the dense model and with a random re-initialisation of the
same mask."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...core import BadInput, CompressionResult, StepContext
from ...train import output_layers
from .common import _evaluate, _example, _finetune, _keep_schedule, _pct
from .weights import _layer_sparsities, _sparsity, _zero_masks, prune_weights_, weight_targets


def _run_lottery(cfg, model: nn.Module, ctx: StepContext) -> CompressionResult:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019): prune the trained
    weights, rewind the survivors to their initial values, retrain; repeat. Then retrain the same
    mask from a random re-initialisation, the control a ticket must beat."""
    import pandas as pd

    init = ctx.init_state
    if not init:
        raise BadInput("--lottery needs the model's initial weights: register it with "
                       "%nbcompress NAME --remember-init before training (API: init_state=...)")
    state = model.state_dict()
    missing = [k for k in state if k not in init]
    if missing:
        raise BadInput(f"the recorded initial weights do not match the model (no {missing[0]!r}):"
                       f" was it changed since they were recorded?")
    for k, v in state.items():
        if tuple(init[k].shape) != tuple(v.shape):
            raise BadInput(f"the recorded initial weights do not match the model ({k}: "
                           f"{tuple(init[k].shape)} recorded, {tuple(v.shape)} now); record them "
                           f"again with %nbcompress NAME --remember-init")
    if ctx.evaluator is None:
        raise BadInput("--lottery compares the ticket with the dense model: give --eval LOADER")
    notes: list[str] = []
    targets = weight_targets(model, cfg.layers)
    n_sel = sum(m.weight.numel() for _, m in targets)
    example = _example(cfg, ctx)
    outputs = output_layers(model, targets, example)
    out_rate = cfg.output_rate if cfg.output_rate is not None else 0.5
    scope = cfg.resolved_scope

    untrained = all(torch.equal(v.detach().cpu(), init[k]) for k, v in model.state_dict().items()
                    if v.is_floating_point())
    if untrained:
        _finetune(cfg, model, ctx, _zero_masks(targets), "train dense", 0)
        notes.append(f"the weights equal the recorded initial weights, so the model was "
                     f"trained dense for {cfg.epochs} epoch(s) first (if it was trained before "
                     f"it was registered, record the true initial weights with %nbcompress NAME "
                     f"--remember-init before training)")
    dense_acc = _evaluate(ctx, model)

    def rewind(mdl, masks_by_name):
        mdl.load_state_dict({k: v for k, v in init.items()}, strict=True)
        with torch.no_grad():
            for name, m in weight_targets(mdl, cfg.layers):
                keep = masks_by_name.get(name)
                if keep is not None:
                    m.weight.masked_fill_(~keep.to(m.weight.device).bool(), 0.0)

    rows = []
    keep_sched = _keep_schedule(1 - cfg.amount, cfg.steps)
    # the per-round rate of every layer (the classifier at out_rate times it) that ends at amount
    per_round = _layer_sparsities(targets, outputs, cfg.amount, out_rate, rounds=cfg.steps)
    masks: dict[str, torch.Tensor] = {}
    for k, keep in enumerate(keep_sched):
        s_k = 1 - keep
        if scope == "layer":
            spars = {n: 1 - (1 - r) ** (k + 1) for n, r in per_round.items()}
            prune_weights_(model, spars, importance="l1", targets=targets, seed=cfg.seed + k)
        else:
            prune_weights_(model, s_k, importance="l1", scope="global", targets=targets,
                           seed=cfg.seed + k)
        masks = {n: (m.weight.detach() != 0).cpu() for n, m in targets}
        rewind(model, masks)
        hist = _finetune(cfg, model, ctx, _zero_masks(targets), f"ticket round {k + 1}/{cfg.steps}",
                         k + 1)
        acc = _evaluate(ctx, model)
        nz = sum(int(masks[n].sum()) for n, _ in targets)
        rows.append({"round": k + 1, "weights_left": nz / n_sel, "accuracy": acc,
                     "loss": hist[-1]["loss"] if hist else None})

    # control: the same final mask from a random re-initialisation (each initial tensor's values
    # shuffled: a fresh draw from the very distribution the model was initialised from)
    control = copy.deepcopy(model)
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    shuffled = {}
    params = {k for k, _ in control.named_parameters()}
    for k, v in init.items():
        if k in params and v.is_floating_point() and v.numel() > 1:
            flat = v.reshape(-1)
            shuffled[k] = flat[torch.randperm(flat.numel(), generator=g)].reshape(v.shape)
        else:
            shuffled[k] = v
    control.load_state_dict(shuffled, strict=True)
    with torch.no_grad():
        for name, m in weight_targets(control, cfg.layers):
            m.weight.masked_fill_(~masks[name].to(m.weight.device).bool(), 0.0)
    _finetune(cfg, control, ctx, _zero_masks(weight_targets(control, cfg.layers)),
              "random re-init", cfg.steps)
    rand_acc = _evaluate(ctx, control)

    ticket_acc = rows[-1]["accuracy"]
    left = rows[-1]["weights_left"]
    layer_rows = [{"layer": n, "type": type(m).__name__, "weights": m.weight.numel(),
                   "sparsity": _sparsity(m.weight)} for n, m in targets]
    result = CompressionResult(model=model, layers=layer_rows, notes=notes)
    result.extra.update({"dense_accuracy": dense_acc, "ticket_accuracy": ticket_acc,
                         "random_reinit_accuracy": rand_acc, "weights_left": left,
                         "rounds": cfg.steps, "epochs_per_round": cfg.epochs})
    result.tables["lottery rounds"] = pd.DataFrame(rows)
    result.tables["ticket vs controls"] = pd.DataFrame([
        {"model": "dense (trained)", "weights_left": 1.0, "accuracy": dense_acc},
        {"model": "winning ticket (rewound to init)", "weights_left": left, "accuracy": ticket_acc},
        {"model": "same mask, random re-init", "weights_left": left, "accuracy": rand_acc},
    ])
    result.compare = {"random re-init": control}
    notes.insert(0, f"lottery ticket: {left:.1%} of the weights after {cfg.steps} round(s) of "
                    f"{cfg.epochs} epoch(s) (rewound to the initial weights each round); accuracy "
                    f"{_pct(ticket_acc)} vs dense {_pct(dense_acc)} vs random re-init "
                    f"{_pct(rand_acc)}")
    return result

