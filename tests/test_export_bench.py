"""benchmarks/bench_export.py (issue 18) runs end to end at tiny sizes and writes the JSON the
README and the lead read (no timing asserts: the numbers are the benchmark's, not the test's)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_export as bench  # noqa: E402


def test_bench_export_smoke(tmp_path):
    cfg = bench.Config(runs=2, warmup=1, min_seconds=0.0, lenet_epochs=1, resnet_epochs=1,
                       resnet_width=4, mlp_dims=(16, 32, 8), mlp_batches=(1, 4), batch=8,
                       matrix=("structured prune",), finetune_epochs=0, test_batches=2,
                       tmp=str(tmp_path))
    res = bench.run(cfg, ("agree", "mlp", "matrix"))      # "resnet": the same exports, timed
    out = bench.write(res, tmp_path / "export.json")
    data = json.loads(out.read_text())
    assert {"env", "config", "agree", "mlp", "matrix", "targets"} <= set(data)
    assert set(data["agree"]) == {"lenet_int8_dynamic", "resnet_int8_static"}
    for v in data["agree"].values():
        assert v["n"] == 64 and 0.0 <= v["agreement"] <= 1.0 and v["int8_kernels"] > 0
    mlp = data["mlp"]
    assert set(mlp["batches"]) == {"1", "4"} and mlp["int8_bytes"] > 0
    assert {"wall_ms", "cpu_ms", "rounds"} <= set(mlp["batches"]["4"]["int8"])
    assert mlp["max_abs_diff"] < 1e-4          # the file computes what the int8 model does
    (row,) = data["matrix"]
    assert row["technique"] == "structured prune" and "error" not in row
    assert row["agreement"] == 1.0 and row["ort_ms"] > 0 and row["int8_kernels"] == 0
    assert {"agreement lenet_int8_dynamic", "agreement resnet_int8_static",
            "mlp int8 speedup batch 1", "mlp int8 speedup batch 4", "mlp int8 size ratio",
            "matrix exports"} == set(data["targets"])
    assert all(isinstance(t["met"], bool) for t in data["targets"].values())
