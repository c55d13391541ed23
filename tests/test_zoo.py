"""The zoo matrix's fast subset (issue 15, part 8): a few library models per family x every step.

Each case runs one step of ``benchmarks/bench_zoo.py`` (the same code as the full sweep) on a fresh
copy of a random-weight model and asserts it passes: a crash, a broken model (a step that returns
a model that no longer runs, or a save / load or undo that is not bit-identical) or a refusal
fails it. Only early exits may be refused, in one clear line, and only on the transformers models
(dict inputs).
Known failures are ``xfail(strict=True)`` with their reason, so the test fails (XPASS) the day
they are fixed and the mark must go. torchvision / timm cases skip where those libraries do not
import (torch 2.13 CPU); transformers cases run wherever transformers is installed. CI sets
``NBCOMPRESS_REQUIRE_ZOO=1``: a library that does not import then fails instead of skipping.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_zoo.py"
_spec = importlib.util.spec_from_file_location("bench_zoo", BENCH)
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

MODELS = [(group, name) for group, names in zoo.FAST.items() for name in names]
# Every step must pass on every model here: early exits too (the CNNs and timm's ViT as chains of
# blocks; the transformers models with their own forward hooked, dict inputs and all).
# (group, name, step): why it is refused today though it should pass (xfail, strict: the case
# XPASSes, and fails, the day it is fixed; then remove its line).
KNOWN: dict[tuple[str, str, str], str] = {}
# (GPT-2 lowrank, part 5, and T5 4-bit, part 6, were here until d744393 fixed them)


def _libs_or_skip(group: str) -> None:
    for lib in {"torchvision": ["torchvision"], "timm": ["torchvision", "timm"],
                "transformers": ["transformers"]}[group]:
        try:
            __import__(lib)
        except Exception as e:  # noqa: BLE001 - torchvision raises more than ImportError here
            why = f"{lib} does not import: {type(e).__name__}: {str(e).splitlines()[0]}"
            if os.environ.get("NBCOMPRESS_REQUIRE_ZOO", "") not in ("", "0"):
                pytest.fail(f"NBCOMPRESS_REQUIRE_ZOO is set but {why}")
            pytest.skip(why)


_BUILT: dict = {}


def built(group: str, name: str):
    if (group, name) not in _BUILT:
        _libs_or_skip(group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, example, loader = zoo.build(group, name)
            _BUILT[(group, name)] = (model, example, loader, zoo.logits(model, example), {})
    return _BUILT[(group, name)]


def _cases():
    for group, name in MODELS:
        for step in zoo.STEPS:
            why = KNOWN.get((group, name, step))
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            yield pytest.param(group, name, step, marks=marks, id=f"{group}-{name}-{step}")


@pytest.fixture(autouse=True)
def _strict_text(monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    monkeypatch.setenv("NBCOMPRESS_DISPLAY", "text")
    monkeypatch.setenv("MPLBACKEND", os.environ.get("MPLBACKEND", "Agg"))


@pytest.mark.parametrize("group,name,step", list(_cases()))
def test_zoo_step(group, name, step):
    model, example, loader, ref_out, done = built(group, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status, reason, _ = zoo.cell(step, model, example, loader, ref_out, done)
    assert status == "pass", f"{status}: {reason}"


def test_matrix_covers_what_the_issue_asks():
    """The full sweep's lists: >= 20 timm families, >= 8 transformers architectures of the five
    kinds, every step; and the table counts each status."""
    assert len(zoo.TIMM) >= 20 and len(set(zoo.TIMM)) == len(zoo.TIMM)
    kinds = {"encoder": {"bert", "distilbert", "roberta"}, "decoder": {"gpt2", "llama", "qwen2"},
             "encoder-decoder": {"t5", "bart"}, "vision": {"vit"}, "speech": {"whisper"}}
    assert len(zoo.HF) >= 8 and all(set(zoo.HF) & v for v in kinds.values())
    rows = [{"group": "timm", "model": "a", "steps": {s: {"status": "pass"} for s in zoo.STEPS}},
            {"group": "timm", "model": "b", "steps": {s: {"status": "n/a" if s == "earlyexit"
                                                          else "refused"} for s in zoo.STEPS}}]
    table = zoo.summary(rows, zoo.STEPS)["timm"]
    assert table["prune"] == {"pass": 1, "refused": 1, "crash": 0, "broken": 0, "timeout": 0,
                              "n/a": 0, "models": 2}
    assert table["earlyexit"]["models"] == 1 and table["earlyexit"]["n/a"] == 1
