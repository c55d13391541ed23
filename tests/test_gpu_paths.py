"""Issue 20: the GPU paths, checked where they can be on a CPU.

* ``scripts/gpu_check.py --device cpu --quick`` (every magic, AMP, the host budget, the speed
  section) runs and passes here, so the script a lent GPU runs does not rot; the same script on
  CUDA is the ``gpu``-marked test.
* ``%prune NAME --pattern N:M``: exactly N nonzeros in every group of M inputs, for Linear, Conv and
  transformers' ``Conv1D``; 2:4 Linear layers become ``SemiSparseLinear`` (dense on the CPU).
* ``Int8MatmulLinear``: the int8 GEMM CUDA's int8 runs through ``torch._int_mm``, whose integer
  sums are exact on any device: its numbers are checked here against an independent computation.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nbcompress
from nbcompress.techniques.prune.semisparse import STATS, SemiSparseLinear, dense_only
from nbcompress.techniques.quantize.config import QuantizeConfig
from nbcompress.techniques.quantize.qmodules import Int8MatmulLinear, QuantizedWeightLayer

from conftest import state_equal

ROOT = Path(__file__).resolve().parents[1]


def _run_check(tmp_path, device: str, quick: bool):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", device,
           "--out", str(out)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    proc, res = _run_check(tmp_path, "cpu", quick=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert set(res) == {"env", "magics", "amp", "budget", "speed"}
    assert all(res[k]["ok"] for k in ("magics", "amp", "budget", "speed")), proc.stdout[-4000:]
    steps = res["magics"]["steps"]
    magics = {s["magic"].split()[0] for s in steps}
    assert magics == {"%prune", "%quantize", "%lowrank", "%distill", "%earlyexit"}
    assert len(steps) == 15
    assert all(s["ok"] and s["undo_identical"] and s["redo_identical"] for s in steps)
    assert all(s["devices"] == ["cpu"] for s in steps)
    two_four = next(s for s in steps if "--pattern 2:4" in s["magic"])
    assert two_four["semi_sparse_layers"] == 3            # LeNet-300-100's three Linear layers
    assert res["budget"]["spilled_to_disk"] >= 2 and res["budget"]["undo_redo_identical_on_device"]
    for name in ("mlp", "bert"):
        r = res["speed"][name]
        assert set(r["speedup_vs_fp32"]) == {"fp32", "bf16", "int8", "2:4", "2:4 bf16"}
        assert r["rel_error_vs_fp32"]["2:4"] == 0.0       # dense on the CPU: the masked model
        assert r["rel_error_vs_fp32"]["int8"] < 0.05
        assert r["semi_sparse_calls"]["sparse"] == 0      # no sparse kernels on a CPU
    assert set(res["amp"]["runs"]) == {"fp32", "bf16 autocast"}


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_script_on_cuda(tmp_path):
    proc, res = _run_check(tmp_path, "cuda", quick=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


# ------------------------------------------------------------------------------ N:M pruning

def _groups_nonzero(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w.reshape(w.shape[0], -1).reshape(-1, m) != 0).sum(1)


def test_pattern_keeps_n_of_every_m_in_linear_and_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                        nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(2, 4, 8, 8)
    out = nbcompress.prune(net, pattern="2:4")
    assert out is not net and type(net[3]) is nn.Linear            # the caller's model untouched
    for i in (0, 3, 5):
        assert (_groups_nonzero(out[i].weight.detach(), 4) == 2).all()
    # the kept two are the two largest |w| of each group
    w0, w1 = net[3].weight.detach().reshape(-1, 4).abs(), out[3].weight.detach().reshape(-1, 4)
    kept = w1 != 0
    assert torch.equal(kept.sum(1), torch.full((kept.shape[0],), 2))
    assert (w0[kept].reshape(-1, 2).min(1).values >= w0[~kept].reshape(-1, 2).max(1).values).all()
    assert type(out[3]) is SemiSparseLinear and type(out[0]) is nn.Conv2d
    # on the CPU a SemiSparseLinear is the dense Linear it was
    STATS.update(sparse=0, dense=0)
    with torch.no_grad():
        ref = nn.functional.linear(torch.relu(out[0](x)).flatten(1), out[3].weight, out[3].bias)
        assert torch.equal(out[3](torch.relu(out[0](x)).flatten(1)), ref)
    assert STATS == {"sparse": 0, "dense": 1}
    r = nbcompress.prune(net, 0.75, pattern="1:4", layers="^3$")
    assert (_groups_nonzero(r[3].weight.detach(), 4) == 1).all()
    assert type(r[3]) is nn.Linear                    # only 2:4 has kernels


def test_pattern_on_gpt2_conv1d_groups_run_along_the_inputs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    rep = nbcompress.History(model, example_input=torch.randint(0, 64, (1, 8)),
                             measure_latency=False)
    rep.apply(nbcompress.PruneConfig(pattern="2:4"), progress=False)
    out = rep.current
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
    # the Conv1D ([in, out]) was pruned along its inputs, then became the Linear it is
    layer = out.transformer.h[0].attn.c_attn
    assert type(layer) is SemiSparseLinear and layer.weight.shape == (96, 32)
    attn = layer.weight.detach()
    assert (attn.reshape(-1, 4) != 0).sum(1).eq(2).all()
    assert not (attn.t().reshape(-1, 4) != 0).sum(1).eq(2).all()     # not along the outputs
    notes = rep.current_version.result.notes
    assert any("tied" in n for n in notes)                            # lm_head left whole
    assert any("Conv1D layers became the nn.Linear" in n for n in notes)
    with torch.no_grad():
        y = out(ids).logits
    assert torch.isfinite(y).all() and not torch.equal(y, ref)
    rep.undo()
    assert state_equal(rep.current, model)


def test_pattern_magic_finetune_keeps_the_pattern_and_saves(shell, tmp_path, mnist):
    from nbcompress.data import lenet_300_100

    shell.user_ns.update(net=lenet_300_100(seed=0), train=mnist[0], test=mnist[1])
    shell.run_line_magic("nbcompress", "net --eval test")
    rep = shell.run_line_magic("prune", "net --pattern 2:4 --finetune train --epochs 1 "
                                        "--no-progress")
    net = shell.user_ns["net"]
    for m in (net.fc1, net.fc2):
        assert type(m) is SemiSparseLinear and (_groups_nonzero(m.weight.detach(), 4) == 2).all()
    assert "2:4 pattern" in rep.notes[0] and any("sparse tensor cores" in n for n in rep.notes)
    assert rep.after.accuracy > 0.8
    path = tmp_path / "net.nbc"
    nbcompress.save(net, path)
    back = nbcompress.load(path)
    assert type(back.fc1) is SemiSparseLinear and state_equal(back, net)
    assert path.stat().st_size < 0.7 * sum(p.numel() * 4 for p in net.parameters())
    shell.run_line_magic("undo", "net")
    assert type(shell.user_ns["net"].fc1) is nn.Linear


@pytest.mark.parametrize("line, message", [
    ("net --pattern 2:4 --structured", r"^give --pattern or --structured, not both$"),
    ("net 0.6 --pattern 2:4", r"^--pattern 2:4 removes 0.5 of the weights \(2 of every 4\): "
                              r"leave out AMOUNT or give 0.5$"),
    ("net --pattern 4:2", r"^--pattern must be N:M with 0 < N < M <= 64"),
    ("net --pattern half", r"^--pattern must be N:M"),
    ("net --pattern 2:4 --steps 3", r"^--pattern 2:4 is reached in one step: leave out --steps$"),
    ("odd --pattern 2:4", r"^--pattern 2:4 needs layers whose inputs per output channel are a "
                          r"multiple of 4; none is \(e.g. '0': 7\)$"),
])
def test_pattern_bad_input_leaves_the_model(shell, line, message):
    from IPython.core.error import UsageError

    torch.manual_seed(0)
    shell.user_ns.update(net=nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                         odd=nn.Sequential(nn.Linear(7, 5)))
    before = {k: shell.user_ns[k] for k in ("net", "odd")}
    snap = {k: {n: t.clone() for n, t in v.state_dict().items()} for k, v in before.items()}
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("prune", line)
    for k, v in before.items():
        assert shell.user_ns[k] is v
        assert all(torch.equal(v.state_dict()[n], t) for n, t in snap[k].items())


def test_semisparse_counts_dense_flops_and_dense_only_nests():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = nbcompress.prune(nn.Sequential(lin), pattern="2:4")
    x = torch.randn(3, 64)
    before = nbcompress.measure(nn.Sequential(lin), x)
    after = nbcompress.measure(m, x)
    assert after.flops == before.flops                       # the dense op, counted as such
    assert after.sparse_flops < 0.55 * before.flops
    with dense_only(), dense_only():
        y = m(x)
    assert torch.equal(y, nn.functional.linear(x, m[0].weight, m[0].bias))


# ------------------------------------------------------------------------------ int8 GEMM

def _int8_layer(lin: nn.Linear) -> Int8MatmulLinear:
    from nbcompress.techniques.quantize.lowbit import _weight_layer, uniform_quantize

    codes, scale, zp = uniform_quantize(lin.weight.detach(), 8, per_channel=True, symmetric=True,
                                        search=False)
    return _weight_layer(lin, codes, scale, zp, 8, True, True, int8_matmul=True)


def test_int8_matmul_linear_computes_the_int8_product_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = _int8_layer(lin)
    assert type(q) is Int8MatmulLinear
    x = torch.randn(5, 7, 64)
    torch.set_grad_enabled(False)
    try:
        _check_int8_product(q, lin, x)
    finally:
        torch.set_grad_enabled(True)


def _check_int8_product(q, lin, x):
    y = q(x)
    # independently: per-row absmax codes, an int64 product, the two scales
    x2 = x.reshape(-1, 64)
    s_x = x2.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x2 / s_x).clamp(-127, 127).long()
    ref = (xq @ q.codes.long().t()).float() * s_x * q.scale.float() + lin.bias
    assert torch.allclose(y.reshape(-1, 48), ref, rtol=1e-6, atol=1e-6)
    rel = float((y - lin(x)).norm() / lin(x).norm())
    assert 0 < rel < 0.02
    assert y.shape == (5, 7, 48) and y.dtype == torch.float32
    assert torch.equal(q(torch.zeros(2, 64)), lin.bias.detach().expand(2, 48))   # zero rows
    assert torch.allclose(q(x.bfloat16()).float(), y, rtol=0.02, atol=0.02)   # bf16 in and out


def test_int8_matmul_through_quantize_history_storage(monkeypatch, tmp_path):
    """What ``%quantize --mode dynamic`` does to a model on CUDA, run here by choosing that mode
    (the choice itself needs a GPU; it is checked apart below)."""
    from nbcompress.techniques.quantize import config as qconfig

    def choose(self, model, device, origin=None):
        return "int8_mm", [qconfig._INT8_MM_NOTE]

    monkeypatch.setattr(QuantizeConfig, "_choose", choose)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10), nn.ReLU(),
                          nn.Linear(10, 8))
    x = torch.randn(4, 64)
    h = nbcompress.History(model, example_input=x, measure_latency=False)
    rep = h.apply(QuantizeConfig(mode="dynamic"), progress=False)
    out = h.current
    assert [type(m) for m in (out[0], out[2], out[4])] == [Int8MatmulLinear, QuantizedWeightLayer,
                                                           QuantizedWeightLayer]
    assert any(n.startswith("1 of 3 layers compute in int8") for n in rep.notes)
    assert rep.after.flops == rep.before.flops            # aten._int_mm counted like aten.mm
    assert rep.after.packed_bytes < 0.35 * rep.before.packed_bytes
    path = tmp_path / "q.nbc"
    nbcompress.save(out, path)
    back = nbcompress.load(path)
    assert type(back[0]) is Int8MatmulLinear and torch.equal(back(x), out(x))
    h.undo()
    assert state_equal(h.current, model)


def test_int8_on_cuda_is_chosen_for_dynamic_and_bits_8():
    """The mode choice for a model living on CUDA (pure logic: no GPU needed to decide)."""
    cuda = torch.device("cuda")
    model = nn.Sequential(nn.Linear(16, 16))
    assert QuantizeConfig(mode="dynamic")._choose(model, cuda, cuda)[0] == "int8_mm"
    assert QuantizeConfig(bits=8)._choose(model, cuda, cuda)[0] == "int8_mm"
    with pytest.raises(nbcompress.BadInput, match="CPU only"):
        QuantizeConfig(mode="static", calib=[torch.zeros(1, 16)])._choose(model, cuda, cuda)
