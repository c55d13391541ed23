"""%slim on the layers of mobile and modern CNNs: depthwise convolutions (their ``groups`` follow
the width), LayerNorm over the channels (ConvNeXt's channels-first one too), GroupNorm (whole
groups), per-channel parameters of other modules (layer scale), and attention heads left whole.
Each: the reorder keeps the full network's function, the width-0.5 sliced forward equals the plain
network ``at_width(0.5)`` cuts out, that network is really smaller, and save / load round trips."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nbcompress
from nbcompress import BadInput, SlimmableNet
from nbcompress.counting import count_flops
from nbcompress.techniques.slim import plan_widths


# ------------------------------------------------------------------ the models
def _dw_separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
            nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, + its input."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h),
                                    nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False),
                                nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


def mobile_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         *_dw_separable(16, 32, 1), InvertedResidual(32),
                         *_dw_separable(32, 64, 2), InvertedResidual(64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of NCHW (ConvNeXt's LayerNorm2d)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                            self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))      # layer scale

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, c: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.stem_norm = ChannelsFirstLayerNorm(c, eps=1e-6)
        self.blocks = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c))
        self.head_norm = nn.LayerNorm(c, eps=1e-6)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.head(self.head_norm(x.mean((2, 3))))


def convnext(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = TinyConvNeXt()
    with torch.no_grad():       # norms and layer scales not at their identity init: a reorder
        for mod in m.modules():  # that forgot them would show
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
            if isinstance(mod, ConvNeXtBlock):
                mod.gamma.uniform_(0.2, 1.0)
    return m


MODELS = {"mobilenet": (mobile_net, (InvertedResidual,)),
          "convnext": (convnext, (ChannelsFirstLayerNorm, ConvNeXtBlock, TinyConvNeXt))}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16), x[:8]


@pytest.fixture(scope="module", params=sorted(MODELS))
def slimmed(request, data):
    loader, _ = data
    make, classes = MODELS[request.param]
    m = make()
    sn = nbcompress.slim(m, loader, widths=[0.5, 1], epochs=1)
    return request.param, m, sn, classes


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("name", sorted(MODELS))
def test_reorder_keeps_the_full_network(name, data):
    _, x = data
    m = MODELS[name][0]().eval()
    before = m(x)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    plan = plan_widths(m, x[:1], [0.5, 1.0])
    assert torch.allclose(m(x), before, atol=1e-5)
    assert any(not torch.equal(v, snap[k]) for k, v in m.state_dict().items())  # reordered
    spec = plan.spec["0.5"]
    if name == "mobilenet":
        assert spec["3.weight"] == [8]                  # depthwise: rows only, [16, 1, 3, 3]
        assert spec["6.weight"] == [16, 8]
        assert spec["9.dw.0.weight"] == [64]
    else:
        assert spec["stem_norm.weight"] == [16] and spec["blocks.0.gamma"] == [16]
        assert spec["blocks.0.dw.weight"] == [16] and spec["blocks.1.fc1.weight"] == [64, 16]
        assert spec["head.weight"] == [10, 16]


def test_each_width_is_a_real_narrower_network(slimmed, data):
    name, m, sn, _ = slimmed
    _, x = data
    assert isinstance(sn, SlimmableNet) and sn.widths == [0.5, 1.0]
    sn = copy.deepcopy(sn).eval()
    sn.width = 0.5
    plain = sn.at_width(0.5).eval()
    assert type(plain) is type(m)
    with torch.enable_grad():                        # the sliced forward (functional_call)
        sliced = sn(x)
    with torch.no_grad():
        ref = plain(x)
        cached = sn(x)                               # inference: the plain network itself
    assert torch.allclose(sliced, ref, atol=1e-5) and torch.allclose(cached, ref, atol=1e-6)
    full = count_flops(sn.net, x[:1])[0]
    assert count_flops(plain, x[:1])[0] < 0.5 * full
    assert count_flops(sn, x[:1])[0] == count_flops(plain, x[:1])[0]
    # the layer sizes follow the tensors in the cut-out network, and the slimmable one's own
    # modules are back to full size after the sliced call
    if name == "mobilenet":
        assert (plain[3].groups, plain[3].in_channels, plain[3].out_channels) == (8, 8, 8)
        assert plain[9].dw[0].groups == 64 and sn.net[9].dw[0].groups == 128
        assert sn.net[3].groups == 16
    else:
        assert plain.blocks[0].dw.groups == 16 and plain.blocks[0].norm.normalized_shape == (16,)
        assert plain.stem_norm.normalized_shape == (16,) and plain.blocks[1].gamma.shape == (16,)
        assert sn.net.blocks[0].dw.groups == 32 and sn.net.stem_norm.normalized_shape == (32,)
    # training at width 0.5 goes through the sliced forward too (gradients reach the weights)
    sn.train()
    sn(x).sum().backward()
    assert all(p.grad is not None for p in sn.parameters() if p.requires_grad)


def test_save_load_round_trip(slimmed, data):
    name, _, sn, classes = slimmed
    _, x = data
    sn = copy.deepcopy(sn).eval()
    sn.width = 0.5
    buf = io.BytesIO()
    nbcompress.save(sn, buf)
    buf.seek(0)
    back = nbcompress.load(buf, classes=classes)
    assert isinstance(back, SlimmableNet) and back.width == 0.5
    for w in (0.5, 1.0):
        back.width = sn.width = w
        with torch.no_grad():
            assert torch.equal(back.eval()(x), sn(x)), w
    sn.width = 0.5
    half = io.BytesIO()
    nbcompress.save(sn, half, width=0.5)
    half.seek(0)
    plain = nbcompress.load(half, classes=classes).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), sn(x), atol=1e-6)


def test_magic_slims_a_mobile_net(shell, data):
    loader, x = data
    shell.user_ns.update(net=mobile_net(1), tr=loader)
    shell.run_line_magic("slim", "net --widths 0.5 --data tr --epochs 1 --no-progress")
    sn = shell.user_ns["net"]
    assert isinstance(sn, SlimmableNet) and sn.widths == [0.5, 1.0]
    shell.run_line_magic("slim", "net --width 0.5")
    half = shell.user_ns["net"].eval()
    with torch.no_grad():
        assert torch.allclose(half(x), half.at_width(0.5).eval()(x), atol=1e-6)


def test_groupnorm_keeps_whole_groups(data):
    """GroupNorm(4, 16): channels reordered group by group (the full network unchanged), width
    0.5 keeps 2 whole groups of 4; 0.3 rounds to 1 group."""
    _, x = data
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    before = m(x)
    plan = plan_widths(m, x[:1], [0.3, 0.5, 1.0])
    assert torch.allclose(m(x), before, atol=1e-5)
    assert plan.spec["0.5"]["1.weight"] == [8] and plan.spec["0.3"]["1.weight"] == [4]
    assert plan.spec["0.3"]["4.weight"] == [5]       # one group: any number of channels
    sn = SlimmableNet(m, [0.3, 0.5, 1.0], plan.spec).eval()
    for w, groups in ((0.5, 2), (0.3, 1)):
        sn.width = w
        plain = sn.at_width(w).eval()
        assert plain[1].num_groups == groups and plain[4].num_groups == 1
        with torch.enable_grad():
            assert torch.allclose(sn(x), plain(x), atol=1e-5), w
    assert sn.net[1].num_groups == 4


class _Attention(nn.Module):
    def __init__(self, c: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 64)
        self.fc2 = nn.Linear(64, c)

    def forward(self, x):
        b, n, c = x.shape

        def split(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(F.gelu(self.fc(self.norm(x))))


def test_attention_heads_are_left_whole():
    """q / k / v channels are heads x head_dim: a reorder or a prefix would move channels
    between heads, so their group stays whole (with a note); the rest is sliced."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), _Attention(), nn.LayerNorm(32), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for lin in (m[1].q, m[1].k):
            lin.weight.mul_(10)                      # attention far from uniform
    x = torch.randn(2, 5, 8)
    before = m(x)
    plan = plan_widths(m, x[:1], [0.5, 1.0])
    assert torch.allclose(m(x), before, atol=1e-5)
    assert any("reach attention heads" in n and "'1.v'" in n for n in plan.notes), plan.notes
    spec = plan.spec["0.5"]
    assert spec["1.q.weight"] == [32, 16] and "1.o.bias" in spec and spec["1.fc.weight"] == [32, 16]
    sn = SlimmableNet(m, [0.5, 1.0], plan.spec, width=0.5).eval()
    with torch.enable_grad():
        assert torch.allclose(sn(x), sn.at_width(0.5).eval()(x), atol=1e-5)


def test_what_is_still_refused_is_named(data):
    _, x = data
    grouped = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with pytest.raises(BadInput, match=r"cannot slim layer '2' \(Conv2d\): a grouped "
                                       r"convolution \(groups=4\)"):
        plan_widths(grouped, x[:1], [0.5, 1.0])
    mult = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with pytest.raises(BadInput, match=r"cannot slim layer '2' \(Conv2d\): a depthwise "
                                       r"convolution with channel multiplier 2"):
        plan_widths(mult, x[:1], [0.5, 1.0])
    ln = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 30, 30]), nn.ReLU(), nn.Flatten(),
                       nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(BadInput, match=r"cannot slim layer '1' \(LayerNorm\): a LayerNorm over "
                                       r"more than the channels"):
        plan_widths(ln, x[:1], [0.5, 1.0])


# ------------------------------------------------------------------ library models
def _library_check(m, x):
    m.eval()
    before = m(x)
    plan = plan_widths(m, x, [0.5, 1.0])
    assert torch.allclose(m(x), before, atol=1e-4)
    sn = SlimmableNet(m, [0.5, 1.0], plan.spec, width=0.5).eval()
    plain = sn.at_width(0.5).eval()
    with torch.enable_grad():
        a = sn(x)
    with torch.no_grad():
        assert torch.allclose(a, plain(x), atol=1e-4, rtol=1e-3)
    assert count_flops(plain, x)[0] < 0.5 * count_flops(m, x)[0]
    return plain


def test_torchvision_mobilenet_v2_slims():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = _library_check(tv.models.mobilenet_v2(num_classes=10), torch.randn(1, 3, 64, 64))
    dw = plain.features[1].conv[0][0]                # the first depthwise conv: 32 -> 16
    assert dw.groups == dw.in_channels == dw.out_channels == 16


def test_timm_convnext_atto_slims():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.2, 1.0)                 # layer scale off its 1e-6 init
    plain = _library_check(m, torch.randn(1, 3, 64, 64))
    assert plain.stem[1].normalized_shape == (20,)   # LayerNorm2d over 40 channels, halved
