"""Options declared once: a toy technique registered in this file (one config, two options, a
``run``) gets a working ``%toy`` magic with help, history, undo and dashboard; errors name fields
in Python and flags on the magic line; every flag parses its kind in one place, quotes included."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from nbcompress.core import (TECHNIQUES, BadInput, CompressionResult, FieldError, StepConfig,
                             register_technique, unregister_technique)
from nbcompress.options import check_fields, magic_spelling, option, parse_text


@dataclass
class ToyConfig(StepConfig):
    """Scale the weights of the layers matching ``layers`` (a toy technique)."""

    technique: ClassVar[str] = "toy"
    summary: ClassVar[str] = "scale some weights (a test technique)"
    examples: ClassVar[tuple] = ("%toy model 0.5 --layers fc",)
    factor: float = option(0.5, kind="fraction", positional=True, range="(0, 1]",
                           help="what the weights are multiplied by")
    layers: str | None = option(None, kind="regex", help="only layers whose name matches")

    def run(self, model, ctx):
        import re

        rows = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and (self.layers is None or re.search(self.layers, name)):
                with torch.no_grad():
                    m.weight.mul_(self.factor)
                rows.append({"layer": name, "factor": self.factor})
        return CompressionResult(model=model, layers=rows)


@pytest.fixture
def toy(ip):
    register_technique(ToyConfig)
    yield ToyConfig
    unregister_technique("toy")
    ip.magics_manager.magics["line"].pop("toy", None)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_toy_technique_gets_a_whole_magic(toy, shell):
    assert TECHNIQUES["toy"] is ToyConfig
    assert "toy" in shell.magics_manager.magics["line"]
    original = _net()     # (not a local named net: run_line_magic sees the caller's locals)
    w0 = original[2].weight.detach().clone()
    shell.user_ns["net"] = original
    report = shell.run_line_magic("toy", 'net 50% --layers "2$"')
    new = shell.user_ns["net"]
    assert torch.allclose(new[2].weight, w0 * 0.5)
    assert torch.equal(new[0].weight, original[0].weight)
    assert torch.equal(original[2].weight, w0)       # the user's object is never changed
    # history, dashboard: the report has before/after metrics and one history row per version
    assert report.technique == "toy" and report.history is not None and len(report.history) == 2
    assert "toy" in str(report)
    # undo gives back the original weights
    shell.run_line_magic("undo", "net")
    assert torch.equal(shell.user_ns["net"][2].weight, w0)
    # help: generated from the declarations
    doc = shell.find_line_magic("toy").__doc__
    assert "FACTOR" in doc and "--layers" in doc and "what the weights are multiplied by" in doc
    assert "%toy model 0.5 --layers fc" in doc and "--eval" in doc and "(default 0.5)" in doc


def test_toy_errors_speak_the_callers_language(toy, shell):
    original = _net()
    shell.user_ns["net"] = original
    with pytest.raises(UsageError, match=r"^FACTOR must be a fraction in \(0, 1\]"):
        shell.run_line_magic("toy", "net 1.5")
    with pytest.raises(UsageError, match=r"^--layers '\(' is not a valid regular expression"):
        shell.run_line_magic("toy", "net 0.5 --layers (")
    with pytest.raises(UsageError, match=r"FACTOR must be a number between 0 and 1 .*'half'"):
        shell.run_line_magic("toy", "net half")
    assert shell.user_ns["net"] is original and shell._nbcompress_workspace.get("net") is None
    net = original
    # the same mistakes from Python name the fields
    with pytest.raises(FieldError, match=r"^factor must be a fraction in \(0, 1\]"):
        nbcompress.compress(net, ToyConfig(factor=1.5))
    with pytest.raises(FieldError, match=r"^layers '\(' is not a valid regular expression"):
        nbcompress.compress(net, ToyConfig(layers="("))


@dataclass
class _Combo(StepConfig):
    technique: ClassVar[str] = "combo"
    amount: float | None = option(None, kind="fraction", positional=True, help="how much",
                                  conflicts="target")
    target: float | None = option(None, kind="fraction", help="what to keep")
    finetune: object = option(None, kind="loader", help="data to train on")
    epochs: int = option(1, kind="int", range="[1, inf)", requires="finetune", help="epochs")
    lr: float = option(1e-3, kind="float", range="(0, inf)", requires="finetune", help="rate")
    mode: str = option("a", kind="choice", choices=("a", "b"), help="which")
    T: float = option(4.0, kind="float", flag="--temperature", short="-T", help="temperature")


def test_requires_and_conflicts_in_both_spellings():
    spell = magic_spelling(_Combo)
    with pytest.raises(FieldError) as e:
        check_fields(_Combo(amount=0.5, epochs=3))
    assert str(e.value) == ("epochs only applies with finetune: give finetune too (or leave out "
                            "epochs)")
    assert e.value.spelled(spell) == ("--epochs only applies with --finetune: give --finetune too "
                                      "(or leave out --epochs)")
    with pytest.raises(FieldError) as e:
        check_fields(_Combo(amount=0.5, epochs=3, lr=0.1))
    assert e.value.spelled(spell).startswith("--epochs and --lr only apply with --finetune")
    with pytest.raises(FieldError) as e:
        check_fields(_Combo(amount=0.5, target=0.3))
    assert str(e.value) == "give amount or target, not both"
    assert e.value.spelled(spell) == "give AMOUNT or --target, not both"
    with pytest.raises(FieldError) as e:
        check_fields(_Combo(mode="c"))
    assert str(e.value) == "mode must be one of a, b, got 'c'"
    with pytest.raises(FieldError) as e:
        check_fields(_Combo(epochs=0, finetune=None))
    assert e.value.spelled(spell) == "--epochs must be a whole number >= 1, got 0"
    with pytest.raises(FieldError, match="T must be a finite number"):
        check_fields(_Combo(T=float("nan")))
    assert FieldError("{T} too hot").spelled(spell) == "-T too hot"
    assert FieldError("{mode='b'} needs data").spelled(spell) == "--mode b needs data"
    assert str(FieldError("{mode='b'} needs data")) == "mode='b' needs data"
    assert isinstance(FieldError("x"), BadInput)


def test_each_kind_parses_its_text_in_one_place():
    opts = dict((f.name, o) for f, o in _Combo.options())
    assert parse_text("amount", opts["amount"], "50%") == 0.5
    assert parse_text("amount", opts["amount"], "'.25'") == 0.25
    assert parse_text("mode", opts["mode"], '"B"') == "b"
    assert parse_text("epochs", opts["epochs"], "3") == 3
    with pytest.raises(FieldError, match=r"^epochs must be a whole number, got '3.5'"):
        parse_text("epochs", opts["epochs"], "3.5")
    with pytest.raises(FieldError, match=r"^lr must be a number, got 'fast'"):
        parse_text("lr", opts["lr"], "fast")


def test_python_verb_unknown_keyword_names_the_closest_field():
    with pytest.raises(BadInput, match="unknown option 'epoch'; did you mean epochs"):
        _Combo.check_options({"epoch": 3}, "combo")


# Every option each magic had before its options were declared on its config (2026-12-01, from
# the hand-written magics): the generated magics must keep them all.
OPTIONS_BEFORE = {
    "prune": (['name', 'amount'], ['--amounts', '--data', '--device', '--epochs', '--eval', '--finetune', '--importance', '--layers', '--lottery', '--lr', '--no-progress', '--round-to', '--scope', '--seed', '--sensitivity', '--sparsity-reg', '--steps', '--structured', '--target-flops', '--target-params']),
    "quantize": (['name'], ['--asymmetric', '--bits', '--calib', '--calib-batches', '--device', '--dtype', '--epochs', '--eval', '--huffman', '--layers', '--lr', '--mode', '--no-progress', '--per-channel', '--qat', '--seed']),
    "lowrank": (['name'], ['--conv', '--data', '--device', '--energy', '--epochs', '--eval', '--finetune', '--layers', '--lr', '--no-progress', '--rank', '--ratio', '--target-params']),
    "distill": (['name'], ['--alpha', '--bias-adjust', '--data', '--device', '--epochs', '--eval', '--feature-weight', '--features', '--lr', '--no-cache', '--no-progress', '--optimizer', '--seed', '--soft-only', '--teacher', '--temperature', '-T']),
    "earlyexit": (['name'], ['--alpha', '--data', '--device', '--epochs', '--eval', '--every', '--exits', '--head-pool', '--joint', '--lr', '--no-progress', '--seed', '--temperature', '--threshold', '-T']),
}


@pytest.mark.parametrize("magic", sorted(OPTIONS_BEFORE))
def test_every_magic_keeps_every_option(shell, magic):
    parser = shell.find_line_magic(magic).parser
    positional, flags = OPTIONS_BEFORE[magic]
    have = set(parser._option_string_actions)
    assert not set(flags) - have, f"%{magic} lost {sorted(set(flags) - have)}"
    got = [a.dest for a in parser._actions if not a.option_strings]
    assert got[:len(positional)] == positional
    doc = shell.find_line_magic(magic).__doc__
    for flag in flags:
        assert flag in doc


def test_required_unless_another_field_is_given():
    @dataclass
    class _Need(StepConfig):
        technique: ClassVar[str] = "need"
        teachers: list = option(default_factory=list, kind="models", required=True,
                                unless="version", help="who to learn from")
        version: int | None = option(None, kind="int", magic=False, help="or a version")

    with pytest.raises(FieldError, match="^teachers is needed: who to learn from"):
        check_fields(_Need())
    check_fields(_Need(version=0))
    check_fields(_Need(teachers=[nn.Linear(2, 2)]))


def test_notes_name_options_as_the_caller_wrote_them(shell, trained_lenet):
    """A note naming an option ("use {layers} to include it") reads fields from Python (compress,
    History.apply) and flags from the magic, like errors."""
    from nbcompress import History, LowRankConfig, compress

    x = torch.randn(1, 1, 28, 28)

    def note(notes):
        return next(n for n in notes if n.startswith("kept the classifier"))

    api = note(compress(trained_lenet, LowRankConfig(ratio=0.5), example_input=x).notes)
    assert "use layers to include it (layers='.' selects every layer)" in api
    h = History(trained_lenet, example_input=x)
    assert "use layers to include it" in note(h.apply(LowRankConfig(ratio=0.5)).result.notes)
    shell.user_ns["lenet"] = trained_lenet
    shell.run_line_magic("nbcompress", "lenet --input-shape 1,1,28,28")
    report = shell.run_line_magic("lowrank", "lenet --ratio 0.5")
    magic = note(report.result.notes)
    assert "use --layers to include it (--layers . selects every layer)" in magic
    assert "{" not in magic and "{" not in api
