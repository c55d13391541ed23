"""%slim / nbcompress.slim: channels reordered without changing the function, every width a real
narrower network (the sliced forward equals the plain cut-out one), per-width BatchNorm, the
width as an undoable step, save / load (all widths, or one width's smaller file), library models,
and bad input leaving the model unchanged."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from nbcompress import BadInput, SlimmableNet, measure
from nbcompress.counting import count_flops
from nbcompress.data import reference_cnn, train_reference
from nbcompress.techniques.slim import SlimConfig, plan_widths
from conftest import digits_cnn, same_as_snapshot, snapshot

WIDTHS = [0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def digits():
    from nbcompress.data import digits_loaders

    return digits_loaders()


@pytest.fixture(scope="module")
def _slim_resnet(digits):
    tr, te = digits
    m = reference_cnn(16, seed=0)
    train_reference(m, tr, epochs=2, seed=0)
    sn = nbcompress.slim(m, tr, widths=WIDTHS, epochs=2, seed=0)
    return m, sn


@pytest.fixture
def slim_resnet(_slim_resnet):
    return copy.deepcopy(_slim_resnet[0]), copy.deepcopy(_slim_resnet[1])


def _x(te, n=32):
    return next(iter(te))[0][:n]


def test_reordering_keeps_the_function(digits):
    """Channels sorted by importance, coupled layers (residual adds, BN, the head) permuted
    together: the full network computes exactly what it did."""
    _, te = digits
    m = reference_cnn(16, seed=1).eval()
    x = _x(te)
    before = m(x)
    plan = plan_widths(m, x[:1], WIDTHS, importance="l1")
    after = m(x)
    assert torch.allclose(before, after, atol=1e-5)
    # every group's channels now come most important first (its L1 score over the coupled
    # layers, as structured pruning ranks them), and some group was not in that order before
    from nbcompress.techniques.prune.channels import ChannelPruner
    from nbcompress.techniques.prune.importance import get_importance

    def ranked(model):
        scores = ChannelPruner(model, x[:1], get_importance("l1"), round_to=1).scores()
        return {k: bool((s[:-1] >= s[1:] - 1e-6).all()) for k, s in scores.items()}

    assert all(ranked(m).values())
    assert not all(ranked(reference_cnn(16, seed=1)).values())
    assert set(plan.spec) == {"0.25", "0.5", "0.75", "1"}
    assert plan.spec["0.5"]["conv1.weight"] == [8, 1]
    assert plan.spec["0.5"]["fc.weight"] == [10, 16]          # classes kept, inputs halved
    assert plan.spec["0.5"]["layer1.bn2.running_mean"] == [8]  # coupled with conv1 by the add


def test_each_width_is_a_real_narrower_network(slim_resnet, digits):
    m, sn = slim_resnet
    _, te = digits
    x = _x(te)
    sn.eval()
    full_flops = count_flops(sn, x[:1])[0]
    params = []
    for w in WIDTHS:
        sn.width = w
        plain = sn.at_width(w).eval()
        assert type(plain) is type(m)
        with torch.enable_grad():                    # the sliced forward (autograd path)
            sliced = sn(x)
        with torch.no_grad():                        # the cached plain network (inference path)
            cached = sn(x)
            ref = plain(x)
        assert torch.allclose(sliced, ref, atol=1e-5), w
        assert torch.allclose(cached, ref, atol=1e-6), w
        params.append(sum(p.numel() for p in plain.parameters()))
        flops = count_flops(sn, x[:1])[0]
        assert flops == count_flops(plain, x[:1])[0]
        if w == 0.5:
            assert flops <= 0.3 * full_flops          # the target: at most 0.3x
    assert params == sorted(params) and params[0] < params[-1] / 8
    assert sum(p.numel() for p in sn.parameters()) == sum(p.numel() for p in m.parameters())


def test_every_width_learned_and_has_its_own_batchnorm(slim_resnet, digits):
    _, sn = slim_resnet
    _, te = digits
    accs = {}
    for w in WIDTHS:
        sn.width = w
        accs[w] = nbcompress.evaluate(sn, te)
    assert accs[1.0] > 0.9 and accs[0.5] > 0.6 and accs[0.25] > 0.3, accs
    assert set(sn.stats) == {"w0_25", "w0_5", "w0_75"}
    st = sn.stats["w0_5"].as_dict()
    assert st["bn1.running_mean"].shape == (8,)
    # its own statistics, not the full width's first half
    assert not torch.allclose(st["bn1.running_var"], sn.net.bn1.running_var[:8])


def test_user_model_unchanged_and_in_place_changes_are_seen(digits):
    tr, te = digits
    m = digits_cnn()
    snap = snapshot(m)
    sn = nbcompress.slim(m, tr, widths="0.5,1", epochs=1)
    assert same_as_snapshot(m, snap)
    sn.eval()
    sn.width = 0.5
    x = _x(te, 8)
    with torch.no_grad():
        a = sn(x)
        sn.net[0].weight.mul_(0.5)                   # the user edits the weights in place
        b = sn(x)
    assert not torch.allclose(a, b)
    assert torch.allclose(b, sn.at_width(0.5).eval()(x), atol=1e-6)


def test_magic_width_is_an_undoable_step(shell, digits):
    tr, te = digits
    m = reference_cnn(8, seed=0)
    train_reference(m, tr, epochs=1, seed=0)
    shell.user_ns.update(net=m, tr=tr, te=te)
    shell.run_line_magic("nbcompress", "net --eval te")
    shell.run_line_magic("slim", "net --widths 0.5,0.75 --data tr --epochs 1 --no-progress")
    sn = shell.user_ns["net"]
    assert isinstance(sn, SlimmableNet) and sn.width == 1.0 and sn.widths == [0.5, 0.75, 1.0]
    r = shell.run_line_magic("slim", "net --width 0.5")
    assert shell.user_ns["net"].width == 0.5 and sn.width == 1.0   # a new version, not in place
    table = r.result.tables["widths"]
    assert list(table["width"]) == [0.5, 0.75, 1.0]
    assert table.loc[table["current"], "width"].item() == 0.5
    assert table["flops"].is_monotonic_increasing
    assert "accuracy vs FLOPs per width" in r.result.figures
    text = repr(r)
    assert "width 1 -> 0.5" in text and "FLOPs" in text
    after = measure(shell.user_ns["net"], _x(te, 1))
    before = measure(sn, _x(te, 1))
    assert after.flops < 0.4 * before.flops and after.params == before.params
    shell.run_line_magic("undo", "net")
    assert shell.user_ns["net"].width == 1.0
    shell.run_line_magic("redo", "net")
    assert shell.user_ns["net"].width == 0.5
    df = shell.run_line_magic("compress_history", "net")
    assert list(df["technique"])[-2:] == ["slim", "slim"]


def test_save_load_all_widths_or_one(slim_resnet, digits, tmp_path):
    _, sn = slim_resnet
    _, te = digits
    x = _x(te)
    sn.eval()
    sn.width = 0.5
    buf = io.BytesIO()
    whole = nbcompress.save(sn, buf)
    buf.seek(0)
    back = nbcompress.load(buf)
    assert isinstance(back, SlimmableNet) and back.width == 0.5 and back.widths == WIDTHS
    for w in WIDTHS:
        back.width = sn.width = w
        with torch.no_grad():
            assert torch.equal(back(x), sn(x))
    path = tmp_path / "half.nbc"
    half = nbcompress.save(sn, path, width=0.5)
    assert half < 0.4 * whole
    plain = nbcompress.load(path).eval()
    assert type(plain).__name__ == "SmallResNet"
    sn.width = 0.5
    with torch.no_grad():
        assert torch.allclose(plain(x), sn(x), atol=1e-6)
    with pytest.raises(BadInput, match="width 0.3 was not trained"):
        nbcompress.save(sn, io.BytesIO(), width=0.3)
    with pytest.raises(BadInput, match="applies to a slimmable network"):
        nbcompress.save(nn.Linear(2, 2), io.BytesIO(), width=0.5)


@pytest.mark.parametrize("line, message", [
    ("net --widths 0,0.5 --data tr", "--widths must be in (0, 1], got 0"),
    ("net --widths 0.5,1.5 --data tr", "--widths must be in (0, 1], got 1.5"),
    ("net --widths 1 --data tr", "at least one width below 1"),
    ("net --widths a,b --data tr", "--widths must be numbers"),
    ("net --width 0.5", "--data LOADER is needed"),
    ("net --widths 0.5 --width 0.75 --data tr", "--width 0.75 is not among the widths"),
    ("net --width 2 --data tr", "--width must be a number in (0, 1]"),
])
def test_bad_input_leaves_the_model_unchanged(shell, digits, line, message):
    tr, _ = digits
    m = reference_cnn(8, seed=0)
    snap = snapshot(m)
    shell.user_ns.update(net=m, tr=tr)
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("slim", line)
    assert message in str(e.value)
    assert shell.user_ns["net"] is m and same_as_snapshot(m, snap)


def test_layers_it_cannot_slice_are_named(digits):
    tr, _ = digits
    # depthwise convs and channel LayerNorms slim (tests/test_slim_zoo.py); grouped convs and a
    # LayerNorm over more than the channels do not
    gc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                       nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(16, 10))
    snap = snapshot(gc)
    with pytest.raises(BadInput, match=r"cannot slim layer '2' \(Conv2d\): a grouped conv"):
        nbcompress.slim(gc, tr, epochs=1)
    assert same_as_snapshot(gc, snap)
    ln = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LayerNorm([8, 8, 8]), nn.ReLU(),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(BadInput, match=r"cannot slim layer '1' \(LayerNorm\): a LayerNorm over "
                                       r"more than the channels"):
        nbcompress.slim(ln, tr, epochs=1)
    tv = pytest.importorskip("torchvision")
    sq = tv.models.squeezenet1_0(num_classes=10).eval()      # Fire modules concat two convs
    with pytest.raises(BadInput, match=r"cannot slim layer '.*' \(Conv2d\): the channels of "
                                       r"'.*' reach it in the middle of its input"):
        plan_widths(sq, torch.randn(1, 3, 64, 64), [0.5, 1.0])


def test_already_slimmable_takes_only_a_width(slim_resnet, digits):
    tr, _ = digits
    _, sn = slim_resnet
    with pytest.raises(BadInput, match=r"only width and depth can change now, not epochs"):
        nbcompress.slim(sn, epochs=3)
    with pytest.raises(BadInput, match=r"width 0.6 was not trained"):
        nbcompress.slim(sn, width=0.6)
    sn.width = 1.0
    half = nbcompress.slim(sn, width=0.5)
    assert half.width == 0.5 and sn.width == 1.0 and half is not sn


def test_torchvision_resnet_slims():
    """A model the project did not write: torchvision's ResNet-18 (random weights), every width
    sliced through its residual stages, the sliced forward equal to the cut-out network."""
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    plan = plan_widths(m, x[:1], [0.5, 1.0])
    sn = SlimmableNet(m, [0.5, 1.0], plan.spec).eval()
    sn.width = 0.5
    plain = sn.at_width(0.5).eval()
    with torch.enable_grad():
        a = sn(x)
    assert torch.allclose(a, plain(x), atol=1e-4)
    assert plain.layer4[1].conv2.out_channels == 256 and plain.fc.in_features == 256
    assert count_flops(plain, x[:1])[0] < 0.3 * count_flops(m, x[:1])[0]


# ------------------------------------------------------------------ %budget
def test_budget_picks_the_most_accurate_width_within_the_flops(shell, slim_resnet, digits):
    _, sn = slim_resnet
    _, te = digits
    sn.width = 1.0
    shell.user_ns.update(net=sn, te=te)
    r = shell.run_line_magic("budget", "net --flops 0.3 --eval te")
    chosen = shell.user_ns["net"]
    table = r.result.tables["candidates"]
    fits = table[table["flops_fraction"] <= 0.3]
    assert len(fits) == 2 and len(table) == 4                # widths 0.25 and 0.5 fit
    assert chosen.width == fits.loc[fits["accuracy"].idxmax(), "setting"]
    assert table["chosen"].sum() == 1 and table["pareto"].any()
    assert "candidates" in r.result.figures
    assert measure(chosen, _x(te, 1)).flops <= 0.3 * measure(sn, _x(te, 1)).flops
    shell.run_line_magic("budget", "net --flops 1")
    assert shell.user_ns["net"].width == table.loc[table["accuracy"].idxmax(), "setting"]
    shell.run_line_magic("undo", "net")
    assert shell.user_ns["net"].width == chosen.width
    before = shell.user_ns["net"]
    with pytest.raises(UsageError, match=r"no configuration fits 1.0% of the FLOPs: the "
                                         r"cheapest is width 0.25 at \d+\.\d%"):
        shell.run_line_magic("budget", "net --flops 0.01")
    assert shell.user_ns["net"] is before and before.width == chosen.width


def test_budget_bad_input(shell, digits):
    shell.user_ns.update(plain=reference_cnn(8, seed=0))
    with pytest.raises(UsageError, match="nothing to choose in a SmallResNet: a budget chooses"):
        shell.run_line_magic("budget", "plain --flops 0.5")
    with pytest.raises(UsageError, match="give --flops F"):
        shell.run_line_magic("budget", "plain")
    with pytest.raises(UsageError, match=r"--flops must be a number in \(0, 1\]"):
        shell.run_line_magic("budget", "plain --flops 0")


def test_choose_early_exit_threshold(digits):
    """The Python verb on an early-exit model: the threshold whose measured average FLOPs fit."""
    tr, te = digits
    cnn = digits_cnn()
    nbcompress.fit(cnn, tr, epochs=2, progress=False)
    ee = nbcompress.early_exit(cnn, tr, exits=[2], epochs=1)
    from nbcompress.techniques.budget import BudgetConfig

    r = nbcompress.compress(ee, BudgetConfig(flops=0.97, progress=False), evaluator=te)
    t = r.tables["candidates"]
    row = t[t["chosen"]].iloc[0]
    assert row["kind"] == "exits" and row["flops_fraction"] <= 0.97
    assert row["label"] == f"exits after 2 at threshold {row['setting']:g}"
    assert r.model.threshold == row["setting"] and r.model.exit_names == ("2",)
    fits = t[t["flops_fraction"] <= 0.97]
    assert row["agreement"] == fits["agreement"].max()
    assert row["accuracy"] == fits[fits["agreement"] == fits["agreement"].max()]["accuracy"].max()
    picked = nbcompress.choose(ee, flops=0.97, evaluator=te)
    assert picked.threshold == row["setting"] and picked is not ee


def test_budget_chooses_among_the_exits_too(digits, shell):
    """%budget on an early-exit model with two exits: every subset x threshold is a candidate;
    a choice that drops an exit leaves a model with the other one, and %undo brings both back."""
    tr, te = digits
    cnn = digits_cnn()
    nbcompress.fit(cnn, tr, epochs=6, lr=1e-2, progress=False)
    ee = nbcompress.early_exit(cnn, tr, exits=[2, 5], epochs=3)
    shell.user_ns.update(exits_net=ee, te=te)   # (not a local name: the magic reads locals first)
    shell.run_line_magic("nbcompress", "exits_net --eval te")
    r = shell.run_line_magic("budget", "exits_net --flops 0.6 --no-progress")
    t = r.result.tables["candidates"]
    labels = set(t["label"])
    assert "no exit (the network alone)" in labels
    assert any(x.startswith("exits after 2, 5 at") for x in labels)
    assert any(x.startswith("exits after 2 at") for x in labels)
    assert any(x.startswith("exits after 5 at") for x in labels)
    chosen = t[t["chosen"]].iloc[0]
    now = shell.user_ns["exits_net"]
    assert chosen["label"].startswith("exits after " + ", ".join(now.exit_names) + " at")
    m = measure(now, example_input=next(iter(te))[0][:1], evaluator=te, latency=False)
    full = measure(cnn, next(iter(te))[0][:1], latency=False)
    assert m.flops <= 0.6 * full.flops * 1.001
    assert m.flops == pytest.approx(chosen["flops"], rel=0.01)
    shell.run_line_magic("undo", "exits_net")
    assert shell.user_ns["exits_net"].exit_names == ("2", "5")


# ------------------------------------------------------------------ depth
def test_residual_blocks_are_found_in_models_we_did_not_write():
    tv = pytest.importorskip("torchvision")
    from nbcompress.techniques.slim.plan import residual_blocks

    # the blocks with an identity shortcut (the first of stages 2-4 downsample: not skippable)
    assert residual_blocks(tv.models.resnet18(), torch.randn(1, 3, 64, 64)) == \
        ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert residual_blocks(reference_cnn(8, blocks=2), torch.randn(1, 1, 28, 28)) == \
        ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert residual_blocks(digits_cnn(), torch.randn(1, 1, 8, 8)) == []


@pytest.fixture(scope="module")
def _deep(digits):
    from nbcompress.core import compress

    tr, te = digits
    m = reference_cnn(8, seed=0, blocks=2)
    train_reference(m, tr, epochs=2, seed=0)
    r = compress(m, SlimConfig(data=tr, widths="0.5,1", depths="0.5,1", epochs=2,
                               progress=False), evaluator=te)
    return m, r


def test_depth_leaves_blocks_out_for_real(_deep, digits):
    m, r = _deep
    sn = copy.deepcopy(r.model)
    _, te = digits
    x = _x(te, 16)
    assert sn.blocks == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    left_out = sn.drops["0.5"]
    assert len(left_out) == 2 and set(left_out) <= set(sn.blocks)
    table = r.tables["widths"]
    assert len(table) == 4 and set(table["depth"]) == {0.5, 1.0}
    full = count_flops(sn, x[:1])[0]
    for w in sn.widths:
        for d in sn.depths:
            sn.width, sn.depth = w, d
            plain = sn.at_width().eval()
            with torch.enable_grad():
                sliced = sn(x)
            with torch.no_grad():
                assert torch.allclose(sliced, plain(x), atol=1e-5), (w, d)
                assert torch.allclose(sn(x), plain(x), atol=1e-6), (w, d)
            skipped = [n for n, mod in plain.named_modules() if isinstance(mod, nn.Identity)]
            assert sorted(skipped) == (sorted(left_out) if d < 1 else [])
            flops = count_flops(sn, x[:1])[0]
            assert flops == count_flops(plain, x[:1])[0]
            if d < 1 and w == 1:
                assert flops < 0.8 * full
    # each configuration below full has its own BatchNorm statistics
    assert set(sn.stats) == {"w0_5", "w0_5_d0_5", "w1_d0_5"}
    buf = io.BytesIO()
    sn.width, sn.depth = 1.0, 0.5
    nbcompress.save(sn, buf)
    buf.seek(0)
    back = nbcompress.load(buf)
    assert back.depth == 0.5 and back.drops == sn.drops
    with torch.no_grad():
        assert torch.equal(back.eval()(x), sn.eval()(x))


def test_depth_switch_and_budget_over_widths_and_depths(_deep, shell, digits):
    _, r = _deep
    _, te = digits
    shell.user_ns.update(deep=copy.deepcopy(r.model), te=te)
    out = shell.run_line_magic("slim", "deep --depth 0.5 --eval te")
    assert shell.user_ns["deep"].depth == 0.5 and "blocks left out" in repr(out)
    b = shell.run_line_magic("budget", "deep --flops 0.6")
    t = b.result.tables["candidates"]
    assert len(t) == 4 and "depth" in t
    fits = t[t["flops_fraction"] <= 0.6]
    row = t[t["chosen"]].iloc[0]
    assert row["accuracy"] == fits["accuracy"].max()
    chosen = shell.user_ns["deep"]
    assert (chosen.width, chosen.depth) == (row["setting"], row["depth"])
    with pytest.raises(UsageError, match=r"--depth 0\.25 was not trained \(trained: 0\.5, 1\)"):
        shell.run_line_magic("slim", "deep --depth 0.25")


def test_depths_need_residual_blocks(digits):
    tr, _ = digits
    m = digits_cnn()
    snap = snapshot(m)
    with pytest.raises(BadInput, match=r"depths needs residual blocks to leave out"):
        nbcompress.slim(m, tr, depths="0.5,1", epochs=1)
    assert same_as_snapshot(m, snap)


def test_latency_budget_picks_within_the_measured_latency(slim_resnet, digits, shell):
    """%budget --latency L: the measured latency of each trained width (one example) against the
    full width's; the choice is the most accurate within L; on an early-exit model the Pareto
    front's choices are timed on one evaluation batch."""
    tr, te = digits
    _, sn = slim_resnet
    from nbcompress.techniques.budget import BudgetConfig

    r = nbcompress.compress(sn, BudgetConfig(latency=0.9, progress=False), evaluator=te)
    t = r.tables["candidates"]
    row = t[t["chosen"]].iloc[0]
    fits = t[t["latency_fraction"] <= 0.9]
    assert row["latency_fraction"] <= 0.9 and row["accuracy"] == fits["accuracy"].max()
    assert t[t["setting"] == 1.0]["latency_fraction"].iloc[0] == 1.0
    assert "of the latency" in r.notes[0]
    with pytest.raises(BadInput, match=r"no configuration fits 0\.1% of the latency: the "
                                       r"cheapest is width 0\.25"):
        nbcompress.choose(sn, latency=0.001, evaluator=te)

    cnn = digits_cnn()
    nbcompress.fit(cnn, tr, epochs=4, lr=1e-2, progress=False)
    ee = nbcompress.early_exit(cnn, tr, exits=[2, 5], epochs=2)
    r = nbcompress.compress(ee, BudgetConfig(latency=0.95, progress=False), evaluator=te)
    t = r.tables["candidates"]
    timed = t[t["latency_fraction"].notna()]
    assert len(timed) >= 2 and len(timed) < len(t)
    assert (t[t["pareto"]]["latency_fraction"].notna()).all()
    row = t[t["chosen"]].iloc[0]
    assert row["latency_fraction"] <= 0.95
    shell.user_ns.update(lat_net=sn, te=te)
    with pytest.raises(UsageError, match=r"^give --flops or --latency, not both$"):
        shell.run_line_magic("budget", "lat_net --flops 0.5 --latency 0.5 --eval te")
