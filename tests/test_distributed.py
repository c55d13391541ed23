"""Issue 19: training on several processes (PyTorch DDP over gloo on this CPU, one thread each),
started by torch.multiprocessing or Hugging Face Accelerate's notebook_launcher, from the one
training loop (``nbcompress.train.fit``), the Python verbs and the magics.

What is proved here: the workers really train in parallel on shards of the data and the result
comes back into the kernel's model (weights move, the loss falls, accuracy is the single
process's within noise); one process under the launcher gives bit-for-bit the plain loop's
weights; pruned zeros, binary codes and frozen parts stay as they are; a worker's exception or a
Ctrl-C in the kernel stops every worker, leaves no process behind and leaves the model and its
history untouched; the step's notes say how it ran.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import _thread

import psutil
import pytest
import torch
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, Subset

import nbcompress
from nbcompress.core import BadInput
from nbcompress.data import digits_loaders
from nbcompress.distributed import shard_loader, unshardable
from nbcompress.train import evaluate, fit

from conftest import digits_cnn, same_as_snapshot, snapshot

CORES = len(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(CORES < 2, reason="needs 2 CPU cores (one per process)")


def _children() -> list:
    """Live child processes of this one (zombies reaped by multiprocessing excluded)."""
    multiprocessing.active_children()       # joins finished ones
    return [p for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def digits():
    train, test = digits_loaders(batch_size=64)
    return train, test


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(128, 10))


# ------------------------------------------------------------------------------ the loop itself
@needs_two
def test_two_processes_train_the_kernels_model(digits):
    train, test = digits
    model = mlp()
    before = snapshot(model)
    acc0 = evaluate(model, test)
    records = fit(model, train, epochs=3, seed=0, processes=2, progress=False, eval_loader=test)
    assert not same_as_snapshot(model, before), "the workers' training did not come back"
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]
    acc = evaluate(model, test)
    assert acc > acc0 + 0.5 and acc > 0.85, (acc0, acc)
    assert records[-1]["accuracy"] == pytest.approx(acc)    # rank 0 evaluated the same weights
    assert model.training                                    # mode as it was
    assert all(p.grad is None for p in model.parameters())  # grads stay in the workers
    assert _children() == []


@needs_two
@pytest.mark.parametrize("launcher", ["none", "accelerate"])
def test_n_processes_with_the_same_global_batch_match_one(digits, launcher):
    """2 processes x 32 a batch against 1 process x 64: the same data per step, accuracy within
    noise (the seeds and sample order differ, so not the same weights)."""
    train, test = digits
    one = mlp()
    fit(one, DataLoader(train.dataset, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0)),
        epochs=4, seed=0, progress=False)
    two = mlp()
    rec = fit(two, DataLoader(train.dataset, batch_size=32, shuffle=True), epochs=4, seed=0,
              processes=2, launcher=launcher, progress=False)
    a1, a2 = evaluate(one, test), evaluate(two, test)
    assert abs(a1 - a2) < 0.03, (a1, a2)
    assert len(rec) == 4


@needs_two
def test_a_loader_with_its_own_worker_processes(digits):
    """DataLoader workers inside the training workers: trained, and nothing left after."""
    train, test = digits
    loader = DataLoader(train.dataset, batch_size=64, shuffle=True, num_workers=1)
    model = mlp()
    fit(model, loader, epochs=2, seed=0, processes=2, progress=False)
    assert evaluate(model, test) > 0.6          # (untrained: about 0.1)
    assert _children() == []


@needs_two
def test_rank_zeros_early_stop_holds_for_every_worker(digits):
    train, test = digits
    seen = []

    def stop_at_two(epoch, record):
        seen.append((epoch, record["accuracy"]))
        return epoch == 2

    records = fit(mlp(), train, epochs=10, processes=2, eval_loader=test, progress=False,
                  on_epoch_end=stop_at_two)
    assert [r["epoch"] for r in records] == [1, 2]
    assert seen == []           # called in the worker (rank 0), not in the kernel
    assert _children() == []


def test_an_accelerator_made_in_the_kernel_is_one_line(digits, monkeypatch):
    from accelerate.state import AcceleratorState

    train, _ = digits
    monkeypatch.setitem(AcceleratorState._shared_state, "_fake", True)
    with pytest.raises(BadInput, match="^Accelerate's notebook_launcher refused to start the "
                                       "workers: .*Accelerator"):
        fit(mlp(), train, processes=2, launcher="accelerate", progress=False)


def test_one_process_under_the_launcher_is_the_plain_loop(digits):
    train, _ = digits

    def loader():
        return DataLoader(train.dataset, batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(3))

    plain, launched = mlp(), mlp()
    r1 = fit(plain, loader(), epochs=2, seed=5, progress=False, scheduler="cosine")
    r2 = fit(launched, loader(), epochs=2, seed=5, progress=False, scheduler="cosine",
             processes=1, launcher="accelerate")
    for a, b in zip(plain.state_dict().values(), launched.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in r1] == [r["loss"] for r in r2]


@needs_two
def test_custom_loss_and_parameters_outside_the_model_are_averaged_and_carried(digits):
    """A technique's own loss (no DDP wrapper): the gradients of the optimizer's parameters are
    all-reduced, an extra module outside the model is trained and comes back, and a tensor the
    loss updates comes back through ``carry``."""
    train, _ = digits
    model, extra = mlp(), nn.Linear(10, 10)
    extra_before = extra.weight.detach().clone()
    seen = torch.zeros((), dtype=torch.long)

    def loss_fn(m, batch):
        x, y = batch
        seen.add_(len(y))
        return nn.functional.cross_entropy(extra(m(x)), y)

    fit(model, train, epochs=1, loss_fn=loss_fn, params=list(model.parameters()) +
        list(extra.parameters()), seed=0, processes=2, progress=False, carry=[seen])
    assert not torch.equal(extra.weight, extra_before)
    n = len(train.dataset)
    assert int(seen) == (n + 1) // 2            # rank 0's shard: half the samples


def test_shard_loader_splits_the_dataset_without_overlap(digits):
    train, _ = digits
    loader = DataLoader(Subset(train.dataset, range(100)), batch_size=16, shuffle=True)
    idx = []
    for rank in range(2):
        part = shard_loader(loader, rank, 2, seed=0)
        assert part.batch_size == 16 and isinstance(part.sampler,
                                                    torch.utils.data.DistributedSampler)
        idx.append(list(iter(part.sampler)))
    assert len(idx[0]) == len(idx[1]) == 50
    assert set(idx[0]).isdisjoint(idx[1]) and set(idx[0]) | set(idx[1]) == set(range(100))
    part.sampler.set_epoch(2)
    assert list(iter(part.sampler)) != idx[1]   # reshuffled every epoch
    init = lambda i: None  # noqa: E731
    with_workers = DataLoader(train.dataset, batch_size=8, num_workers=1, worker_init_fn=init,
                              prefetch_factor=3, persistent_workers=True)
    part = shard_loader(with_workers, 1, 2)
    assert (part.num_workers, part.worker_init_fn, part.prefetch_factor,
            part.persistent_workers) == (1, init, 3, True)


def test_unshardable_loaders_are_named(digits):
    train, _ = digits

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    assert "IterableDataset" in unshardable(DataLoader(Stream(), batch_size=4))
    class Buckets(torch.utils.data.Sampler):
        def __iter__(self):
            return iter([[0, 1], [2, 3]])

        def __len__(self):
            return 2

    assert "batch_sampler (Buckets)" in unshardable(DataLoader(train.dataset,
                                                               batch_sampler=Buckets()))
    # a loader built over another one's plain BatchSampler (distillation's cached outputs) is
    # split by that sampler's batch size
    bs = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(train.dataset), 16, True)
    over = DataLoader(train.dataset, batch_sampler=bs)
    assert unshardable(over) is None
    part = shard_loader(over, 0, 2)
    assert part.batch_size == 16 and part.drop_last and part.sampler.shuffle
    weighted = torch.utils.data.WeightedRandomSampler([1.0] * len(train.dataset), 10)
    assert "WeightedRandomSampler" in unshardable(DataLoader(train.dataset, batch_size=4,
                                                             sampler=weighted))
    assert unshardable(train) is None


# ------------------------------------------------------------------------ failures and Ctrl-C
@needs_two
@pytest.mark.parametrize("launcher", ["none", "accelerate"])
def test_a_workers_exception_stops_all_and_changes_nothing(digits, launcher):
    train, _ = digits
    model = mlp()
    before = snapshot(model)

    def loss_fn(m, batch):
        x, y = batch
        if torch.distributed.get_rank() == 1:
            raise BadInput("rank 1 refuses this batch")
        return nn.functional.cross_entropy(m(x), y)

    t0 = time.monotonic()
    with pytest.raises(BadInput, match="^rank 1 refuses this batch$"):
        fit(model, train, epochs=50, loss_fn=loss_fn, processes=2, launcher=launcher,
            progress=False)
    assert time.monotonic() - t0 < 60      # rank 0 did not train on alone, or hang
    assert same_as_snapshot(model, before)
    assert _children() == []

    def crash(m, batch):
        raise ZeroDivisionError("worker arithmetic")

    with pytest.raises(RuntimeError, match="a training worker failed: ZeroDivisionError: "
                                           "worker arithmetic"):
        fit(model, train, epochs=1, loss_fn=crash, processes=2, launcher=launcher, progress=False)
    assert same_as_snapshot(model, before)
    assert _children() == []


@needs_two
@pytest.mark.parametrize("launcher", ["none", "accelerate"])
def test_ctrl_c_in_the_kernel_stops_every_worker(digits, launcher, tmp_path):
    """The kernel's interrupt (SIGINT to the kernel, KeyboardInterrupt in its main thread) while
    the workers train: every worker is gone after, the model is untouched.

    The interrupt comes once a worker has trained a step (a file it writes says so), not at a
    fixed time: on a slow machine a fixed 4 s could land while the workers were being forked,
    which is not what this test is about (the full CI run hung there twice)."""
    train, _ = digits
    model = mlp()
    before = snapshot(model)
    started = tmp_path / "a worker trains"
    stop = threading.Event()

    def interrupt_when_training():
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.05)
        if not stop.wait(0.5):
            _thread.interrupt_main()

    def slow(m, batch):
        x, y = batch
        started.touch()
        time.sleep(0.05)
        return nn.functional.cross_entropy(m(x), y)

    # a process started in the background by a shell inherits SIGINT ignored, and then Python
    # keeps it ignored and interrupt_main() does nothing: the kernel's handler, as in Jupyter
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=interrupt_when_training, daemon=True)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(model, train, epochs=1000, loss_fn=slow, processes=2, launcher=launcher,
                progress=False)
    finally:
        stop.set()
        signal.signal(signal.SIGINT, old)
    assert time.monotonic() - t0 < 60
    assert same_as_snapshot(model, before)
    assert _children() == [], [p.cmdline() for p in _children()]


# ------------------------------------------------------------------------------ every technique
@pytest.fixture
def digits_ns(shell, digits):
    train, test = digits
    small = DataLoader(Subset(train.dataset, range(512)), batch_size=64, shuffle=True)
    shell.user_ns.update(train_loader=small, test_loader=test)
    return shell


@needs_two
def test_prune_finetune_magic_on_two_processes_keeps_the_zeros(digits_ns):
    sh = digits_ns
    sh.user_ns["net"] = digits_cnn()
    before = snapshot(sh.user_ns["net"])
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    rep = sh.run_line_magic("prune", "net 0.8 --finetune train_loader --epochs 2 --processes 2 "
                                     "--no-progress")
    net = sh.user_ns["net"]
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zero = sum(int((m.weight == 0).sum()) for m in convs)
    total = sum(m.weight.numel() for m in convs)
    assert zero / total == pytest.approx(0.8, abs=0.01)     # fine-tuning kept the mask
    notes = " ".join(rep.result.notes)
    assert "trained on 2 processes" in notes and "DistributedDataParallel over gloo" in notes
    assert "64 samples a batch in each, 128 a step in all" in notes
    h = sh._nbcompress_workspace.get("net")
    assert "processes=2" in h.versions[-1].args and h.versions[-1].args.endswith("processes=2")
    sh.run_line_magic("undo", "net")
    back = sh.user_ns["net"]
    assert all(int((m.weight == 0).sum()) == 0 for m in back.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))          # the dense model again
    assert same_as_snapshot(back, before)
    assert _children() == []


@needs_two
def test_quantize_binary_qat_and_distill_on_two_processes(digits_ns):
    sh = digits_ns
    train = sh.user_ns["train_loader"]
    teacher = digits_cnn(seed=1)
    fit(teacher, train, epochs=3, seed=0, progress=False)
    sh.user_ns.update(teacher=teacher, net=digits_cnn(seed=2))
    before_teacher = snapshot(teacher)
    rep = sh.run_line_magic("distill", "net --teacher teacher --data train_loader --epochs 6 "
                                       "--lr 0.003 --processes 2 --launcher accelerate "
                                       "--no-progress")
    assert "started by Accelerate's notebook_launcher" in " ".join(rep.result.notes)
    assert same_as_snapshot(teacher, before_teacher)
    test = sh.user_ns["test_loader"]
    assert evaluate(sh.user_ns["net"], test) > 0.5     # (one process: 0.93 after 8 epochs)
    sh.run_line_magic("quantize", "net --mode binary --qat train_loader --epochs 1 "
                                  "--processes 2 --no-progress")
    q = sh.user_ns["net"]
    codes = [b for n, b in q.named_buffers() if n.endswith("codes")]
    assert codes, "no binary layer"
    assert all(set(torch.unique(c).tolist()) <= {0, 1, -1} for c in codes)
    assert _children() == []


@needs_two
def test_distill_features_and_earlyexit_custom_losses_on_two_processes(digits):
    """The two techniques whose loss is their own: distillation with feature adapters outside
    the student (their mean loss comes back through carry) and early-exit heads."""
    train, test = digits
    small = DataLoader(Subset(train.dataset, range(512)), batch_size=64, shuffle=True)
    teacher = digits_cnn(seed=1)
    fit(teacher, small, epochs=2, seed=0, progress=False)
    student = digits_cnn(seed=3)
    from nbcompress.core import compress
    from nbcompress.techniques.distill.config import DistillConfig

    res = compress(student, DistillConfig(teachers=[teacher], loader=small, epochs=1,
                                          features=["2:2"], processes=2, progress=False))
    assert res.extra["feature_mse_mean"] > 0        # carried back from rank 0's loss
    assert "gradients averaged by all_reduce" in " ".join(res.notes)
    ee = nbcompress.early_exit(digits_cnn(seed=4), small, exits=[2], epochs=1, processes=2)
    assert len(ee.heads) == 1 and evaluate(ee, test) > 0.0
    assert _children() == []


def test_cuda_initialised_in_the_kernel_is_refused_in_one_line(monkeypatch, digits):
    train, _ = digits
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(BadInput, match="CUDA is already initialised in this kernel"):
        fit(mlp(), train, processes=2, device="cpu", progress=False)


def test_bad_requests_from_python_change_nothing(digits):
    train, _ = digits
    model = mlp()
    before = snapshot(model)
    with pytest.raises(BadInput, match="processes must be a whole number >= 1, got 0"):
        fit(model, train, processes=0)
    with pytest.raises(BadInput, match=r"launcher must be one of none, accelerate, got 'ray'"):
        fit(model, train, processes=2, launcher="ray")
    with pytest.raises(BadInput, match=f"{CORES + 1} processes asked for"):
        nbcompress.prune(model, 0.5, finetune=train, processes=CORES + 1)
    with pytest.raises(BadInput, match="processes only applies with finetune"):
        nbcompress.prune(model, 0.5, processes=2)
    assert same_as_snapshot(model, before)


def test_magic_help_lists_the_shared_options_last(shell):
    from nbcompress.techniques.prune.config import PruneConfig
    from nbcompress.options import options_of

    names = [f.name for f, _ in options_of(PruneConfig)]
    assert names[-2:] == ["processes", "launcher"]
    with pytest.raises(UsageError, match="--processes only applies with --finetune"):
        shell.user_ns["m"] = mlp()
        shell.run_line_magic("prune", "m 0.5 --processes 2")


# ------------------------------------------------------------------------ a model we did not write
@needs_two
def test_hugging_face_bert_with_dict_batches_fine_tunes_on_two_processes(shell):
    """A transformers BertForSequenceClassification (random weights from a config), dict batches
    as a collator yields them, pruned and fine-tuned on 2 processes through the magic."""
    tr = pytest.importorskip("transformers")
    from test_dict_batches import Tokens

    cfg = tr.BertConfig(vocab_size=39, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=3,
                        max_position_embeddings=16)
    torch.manual_seed(0)
    bert = tr.BertForSequenceClassification(cfg).eval()
    train = DataLoader(Tokens(seed=0), batch_size=32, shuffle=True)
    test = DataLoader(Tokens(n=96, seed=1), batch_size=48)
    shell.user_ns.update(bert=bert, text_train=train, text_test=test)
    shell.run_line_magic("nbcompress", "bert --eval text_test")
    acc0 = evaluate(bert, test)
    rep = shell.run_line_magic("prune", "bert 0.3 --finetune text_train --epochs 6 --lr 3e-3 "
                                        "--processes 2 --no-progress")
    tuned = shell.user_ns["bert"]
    assert "trained on 2 processes" in " ".join(rep.result.notes)
    assert evaluate(tuned, test) > max(acc0, 0.5)
    lin = [m for m in tuned.modules() if isinstance(m, nn.Linear)]
    zero = sum(int((m.weight == 0).sum()) for m in lin) / sum(m.weight.numel() for m in lin)
    assert zero > 0.2                         # the mask survived the workers' steps
    assert _children() == []


# ------------------------------------------------------------------------ a real kernel's interrupt
@needs_two
@pytest.mark.parametrize("launcher", ["none", "accelerate"])
def test_interrupting_a_real_kernel_mid_training_leaves_no_worker_and_the_model(launcher):
    """What a user does: a Jupyter kernel runs ``%prune ... --processes 2``; the notebook's stop
    button (``interrupt_kernel``) arrives mid-training. The cell ends in KeyboardInterrupt, the
    kernel has no child process left, the name holds the model it held, its history one version."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def run(code, timeout=120):
            return kc.execute_interactive(code, timeout=timeout,
                                          output_hook=lambda msg: outputs.append(msg))

        def interrupt(msg_id, timeout):
            """The stop button on the running cell ``msg_id``: its reply."""
            km.interrupt_kernel()
            reply = kc.get_shell_msg(timeout=timeout)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = kc.get_shell_msg(timeout=timeout)
            return reply["content"]

        outputs = []
        run("import torch, psutil, os, time\n"
            "from torch import nn\n"
            "from torch.utils.data import DataLoader, TensorDataset\n"
            "torch.manual_seed(0)\n"
            "net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))\n"
            "before = {k: v.clone() for k, v in net.state_dict().items()}\n"
            "class Slow(TensorDataset):\n"
            "    def __getitem__(self, i):\n"
            "        time.sleep(0.01)\n"
            "        return super().__getitem__(i)\n"
            "slow = DataLoader(Slow(torch.randn(4096, 8), torch.randint(0, 2, (4096,))),"
            " batch_size=16, shuffle=True)\n"
            "%load_ext nbcompress\n"
            "%nbcompress net --input-shape 1,8\n")
        msg_id = kc.execute("%prune net 0.5 --finetune slow --epochs 50 --processes 2 "
                            f"--launcher {launcher} --no-progress")
        deadline = time.monotonic() + 60
        kernel = psutil.Process(km.provisioner.process.pid)
        while time.monotonic() < deadline and len(kernel.children(recursive=True)) < 2:
            time.sleep(0.2)
        assert len(kernel.children(recursive=True)) >= 2, "the workers never started"
        time.sleep(1.0)
        reply = interrupt(msg_id, 60)
        assert reply["status"] == "error"
        assert reply["ename"] == "KeyboardInterrupt"
        time.sleep(0.5)
        left = [p for p in kernel.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [p.cmdline() for p in left]
        outputs.clear()
        run("h = get_ipython()._nbcompress_workspace.get('net')\n"
            "print(len(h.versions), all(torch.equal(v, before[k]) for k, v in "
            "net.state_dict().items()))")
        text = "".join(m["content"].get("text", "") for m in outputs
                       if m["msg_type"] == "stream")
        assert text.split() == ["1", "True"], text
        # and the kernel's Ctrl-C is its own again: a plain loop is interrupted as usual
        msg_id = kc.execute("while True: time.sleep(0.05)")
        time.sleep(1.0)
        assert interrupt(msg_id, 30)["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@needs_two
def test_lowrank_finetune_on_two_processes_keeps_the_factorised_layers(digits):
    """The fifth technique: SVD factors are trained on 2 processes and come back as factors."""
    train, test = digits
    net = mlp()
    fit(net, train, epochs=5, seed=0, progress=False)
    from nbcompress.core import compress
    from nbcompress.techniques.lowrank.config import LowRankConfig

    res = compress(net, LowRankConfig(rank=8, finetune=train, epochs=2, processes=2,
                                      launcher="accelerate", progress=False))
    n_params = sum(p.numel() for p in res.model.parameters())
    assert n_params < sum(p.numel() for p in net.parameters())
    assert "trained on 2 processes" in " ".join(res.notes)
    assert evaluate(res.model, test) > 0.8
    assert _children() == []
