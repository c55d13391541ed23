"""Structured pruning of the CNN layers real models use (issue 15, part 5): grouped convolutions
keep equal groups, layer-scale ``gamma`` / GroupNorm / subclassed layers' extra tensors shrink
with their channels, splits and shuffles are left whole instead of breaking the model, and what
still cannot be pruned is refused in one line with the model unchanged. Hand-built modules run
everywhere; timm / torchvision models run where those import (the /tmp/v214 venv) and skip
elsewhere."""
import pytest
import torch
from torch import nn

import nbcompress
from nbcompress.errors import FieldError

X = torch.randn(2, 3, 16, 16)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def rows_kept(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Which rows of ``old`` survive in ``new`` (rows matched by their leading values)."""
    old2, new2 = old.flatten(1), new.flatten(1)
    out = []
    for r in new2:
        hit = [i for i in range(len(old2)) if torch.equal(old2[i][:r.numel()], r)]
        assert len(hit) == 1
        out.append(hit[0])
    return out


class GroupedNet(nn.Module):
    """conv -> BN -> grouped conv (4 groups of 4) -> BN -> 1x1 conv -> head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.conv3(x).mean((2, 3)))


def test_grouped_conv_loses_the_same_positions_in_every_group():
    torch.manual_seed(0)
    m = GroupedNet().eval()
    dead = [1, 5, 9, 13]                       # position 1 of each block of 4: contributes 0
    with torch.no_grad():
        m.conv1.weight[dead] = 0
        m.conv1.bias[dead] = 0
        m.bn1.weight[dead] = 0
        m.bn1.bias[dead] = 0
        m.conv2.weight[:, 1] = 0               # the grouped conv's input position 1, each group
    y0 = m(X)
    p = nbcompress.prune(m, 0.25, structured=True, example_input=X, round_to=1, layers="conv1")
    assert p.conv2.groups == 4 and p.conv2.in_channels == 12 and p.conv1.out_channels == 12
    assert p.conv2.weight.shape == (16, 3, 3, 3)
    keep = [i for i in range(16) if i not in dead]
    assert torch.equal(p.conv1.weight, m.conv1.weight[keep])
    assert torch.allclose(p(X), y0, atol=1e-5)           # only dead channels went
    assert n_params(p) < n_params(m) and m.conv1.out_channels == 16


def test_grouped_conv_both_sides_and_global_scope():
    torch.manual_seed(0)
    m = GroupedNet().eval()
    for scope in ("layer", "global"):
        p = nbcompress.prune(m, 0.5, structured=True, example_input=X, round_to=1, scope=scope)
        c = p.conv2
        assert c.groups == 4 and c.in_channels % 4 == 0 and c.out_channels % 4 == 0
        assert c.weight.shape[:2] == (c.out_channels, c.in_channels // 4)
        assert p.bn2.num_features == c.out_channels == p.conv3.in_channels
        assert p(X).shape == (2, 10) and n_params(p) < n_params(m)


class LayerScaleBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, channels-last LayerNorm and MLP, layer scale gamma."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.arange(c, dtype=torch.float) + 1)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(torch.nn.functional.gelu(self.pw1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class LayerScaleNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.blocks = nn.Sequential(LayerScaleBlock(c), LayerScaleBlock(c))
        self.norm = nn.GroupNorm(4, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x))).mean((2, 3)))


def test_layer_scale_and_groupnorm_shrink_with_their_channels():
    torch.manual_seed(0)
    m = LayerScaleNet().eval()
    p = nbcompress.prune(m, 0.5, structured=True, example_input=X, round_to=1)
    c = p.stem.out_channels
    assert c < 16 and c % 4 == 0                          # GroupNorm(4) keeps equal groups
    assert p.norm.num_channels == c and p.norm.num_groups == 4
    kept = rows_kept(p.stem.weight.detach(), m.stem.weight.detach())
    for blk, old in zip(p.blocks, m.blocks):
        assert blk.gamma.shape == (c,) and blk.dw.groups == c
        assert torch.equal(blk.gamma.detach(), old.gamma.detach()[kept])  # the same channels
        assert blk.pw1.out_features < 64                  # the MLP hidden width pruned too
    assert p(X).shape == (2, 10) and n_params(p) < n_params(m)
    assert m.blocks[0].gamma.shape == (16,)


class Scale(nn.Module):
    """timm's poolformer ``Scale``: a per-channel vector viewed with a shape stored at init."""

    def __init__(self, dim):
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.scale.view(self.shape)


def test_a_scale_vector_and_the_shape_it_is_viewed_with_follow_the_channels():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), Scale(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    p = nbcompress.prune(m, 0.5, structured=True, example_input=X, round_to=1)
    assert p[1].scale.shape == (8,) and p[1].shape == (8, 1, 1) and m[1].shape == (16, 1, 1)
    kept = rows_kept(p[0].weight.detach(), m[0].weight.detach())
    assert torch.equal(p[1].scale.detach(), m[1].scale.detach()[kept])
    assert p(X).shape == (2, 10)


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass with one more per-output-channel tensor (timm's ScaledStdConv2d)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.gain, self.bias)


class MyLinear(nn.Linear):
    pass


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ScaledConv(3, 16, 3)
        self.fc1, self.fc2 = MyLinear(16, 32), MyLinear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).mean((2, 3)))))


def test_subclassed_layers_are_their_base_types_and_keep_extra_tensors_aligned():
    torch.manual_seed(0)
    m = SubclassNet().eval()
    p = nbcompress.prune(m, 0.5, structured=True, example_input=X, round_to=1)
    assert p.conv.out_channels == 8 and p.conv.gain.shape == (8, 1, 1, 1)
    assert p.fc1.out_features == 16 and p.fc1.in_features == 8
    kept = rows_kept(p.conv.weight.detach(), m.conv.weight.detach())
    assert torch.equal(p.conv.gain.detach(), m.conv.gain.detach()[kept])
    assert p(X).shape == (2, 10)


class SplitNet(nn.Module):
    """A split by a stored width (res2net / CSP): the halves' channels are the model's attribute."""

    def __init__(self):
        super().__init__()
        self.width = 8
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.a, self.b = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.mid = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        xa, xb = torch.split(self.conv1(x), self.width, 1)
        y = torch.cat([self.a(xa), self.b(xb)], 1)
        return self.head(torch.relu(self.mid(y)).mean((2, 3)))


def test_groups_through_a_split_stay_whole_and_the_rest_is_pruned():
    torch.manual_seed(0)
    m = SplitNet().eval()
    p = nbcompress.prune(m, 0.5, structured=True, example_input=X, round_to=1)
    assert p.conv1.out_channels == 16                     # feeds the split: left whole
    assert p.mid.out_channels == 12                       # free: pruned
    assert p(X).shape == (2, 10) and n_params(p) < n_params(m)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)   # channel shuffle
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


def test_channel_shuffle_is_left_whole_not_misaligned():
    torch.manual_seed(0)
    m = Shuffle().eval()
    p = nbcompress.prune(m, 0.5, structured=True, example_input=X, round_to=1)
    assert p.conv1.out_channels == 16 and p.conv2.out_channels == 8
    assert p(X).shape == (2, 10)


class MatrixParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.pos = nn.Parameter(torch.zeros(1, 16, 14, 14))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head((self.conv(x) + self.pos).mean((2, 3)))


def test_a_parameter_that_is_not_per_channel_is_refused_in_one_line():
    m = MatrixParam()
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(FieldError, match=r"layer '\(model\)' \(MatrixParam\).*'pos'") as e:
        nbcompress.prune(m, 0.5, structured=True, example_input=X)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snap.items())


# ------------------------------------------------------------------- timm / torchvision
def _check_zoo_model(m, x):
    m.eval()
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    p = nbcompress.prune(m, 0.3, structured=True, example_input=x)
    with torch.no_grad():
        y = p.eval()(x)
    assert y.shape[-1] == 1000 and torch.isfinite(y).all()
    assert n_params(p) < 0.9 * n_params(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snap.items())
    return p


@pytest.mark.parametrize("name", ["regnetx_002", "convnextv2_atto", "ghostnet_100", "lcnet_050"])
def test_timm_families(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    p = _check_zoo_model(timm.create_model(name, pretrained=False), torch.randn(1, 3, 64, 64))
    for mod in p.modules():                         # grouped convs stay consistent
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            assert mod.in_channels % mod.groups == 0 and mod.out_channels % mod.groups == 0


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "regnet_x_400mf", "mobilenet_v3_small"])
def test_torchvision_models(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    _check_zoo_model(tv.models.get_model(name, weights=None), torch.randn(1, 3, 64, 64))


def test_layers_only_training_reaches_are_pruned_with_their_inputs():
    """GoogLeNet's auxiliary classifiers run only in training mode: the dependency graph traced in
    eval mode never reaches them, and pruning the channels they read left a model that failed to
    train (the zoo's distill step crashed). They are traced in training mode now (BatchNorm's
    statistics restored after): the pruned model trains, its aux heads read the pruned widths."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=False).eval()
    x = torch.randn(1, 3, 64, 64)
    stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    p = nbcompress.prune(m, 0.3, structured=True, example_input=x)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in stats.items())   # original untouched
    assert p.inception4a.branch1.conv.out_channels < m.inception4a.branch1.conv.out_channels
    assert p.aux1.conv.conv.in_channels < m.aux1.conv.conv.in_channels
    out = p.train()(torch.randn(2, 3, 64, 64))                  # logits, aux2, aux1
    assert [tuple(o.shape) for o in out] == [(2, 10)] * 3
    assert p.eval()(x).shape == (1, 10)
