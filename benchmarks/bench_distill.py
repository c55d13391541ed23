"""Benchmarks for %distill (issue 6), all in one run, on the embedded MNIST subset
(4,000 train / 1,000 test digits).

Teacher: 784-300-100-10 MLP (the LeNet-300-100 shape, 266,610 params) with dropout 0.2, trained
30 epochs with 2-pixel random jitter (about 97% on the 1,000 test digits). The issue's throwaway
teacher, 784-800-800-10 with dropout 0.5 (1.28 M params), is
``--teacher-hidden 800,800 --teacher-dropout 0.5 --teacher-epochs 60`` (about 5x the CPU time).
Student: 784-32-16-10 MLP (25,818 params: 10.3x smaller than the default teacher), no dropout.

1. labels:   the student distilled from the teacher (T, alpha) vs the same student (same initial
             weights, same data order, same epochs) trained on hard labels alone, per seed.
             Target: distilled better by >= 0.5 points on average over the seeds.
2. unseen:   every 3 removed from the transfer set; the student distilled on soft targets only.
             Target: >= 45% of the test 3s right with no adjustment, >= 75% after --bias-adjust 3
             (the raise chosen on the other classes' transfer data, never on a 3).
3. ensemble: a student of 3 teachers (softened probabilities averaged) vs a student of the best
             single teacher (best by test accuracy: the most favourable choice for the single
             teacher). Target: the ensemble's student at least matches, on average.

    python benchmarks/bench_distill.py                     # the full run (100 epochs x 5 seeds;
                                                           # about 22 min on a busy 2-core CPU)
    python benchmarks/bench_distill.py --epochs 30 --seeds 3 --parts labels,unseen

Prints a table per part and writes benchmarks/results/distill.json (updated after every part).
Trained teachers are kept in --cache-dir so a rerun of one part does not retrain them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nbcompress import compress, evaluate, fit  # noqa: E402
from nbcompress.data import mnist_loaders  # noqa: E402
from nbcompress.techniques.distill import DistillConfig, MLPStudent, mlp_student  # noqa: E402

TEACHER_HIDDEN = (300, 100)      # --teacher-hidden
TEACHER_DROPOUT = 0.2             # --teacher-dropout
STUDENT_HIDDEN = (32, 16)


def log(*a):
    print(*a, flush=True)


def jitter(x: torch.Tensor, shift: int = 2) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-shift, shift] pixels, filling with the
    background value (the global RNG draws the shifts: seeded by fit's seed)."""
    n = x.shape[0]
    bg = float(x.min())
    padded = F.pad(x, (shift, shift, shift, shift), value=bg)
    h, w = x.shape[-2:]
    offs = torch.randint(0, 2 * shift + 1, (n, 2))
    out = torch.empty_like(x)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            sel = (offs[:, 0] == dy) & (offs[:, 1] == dx)
            if sel.any():
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def train_teacher(seed: int, epochs: int, cache_dir: Path, test_loader) -> torch.nn.Module:
    tag = "-".join(map(str, TEACHER_HIDDEN)) + f"_d{TEACHER_DROPOUT:g}"
    path = cache_dir / f"teacher_{tag}_{seed}_{epochs}.pt"
    teacher = MLPStudent(784, TEACHER_HIDDEN, 10, dropout=TEACHER_DROPOUT, seed=1000 + seed)
    if path.exists():
        teacher.load_state_dict(torch.load(path, weights_only=True))
        teacher.eval()
        log(f"  teacher {seed}: loaded from {path} ({100 * evaluate(teacher, test_loader):.2f}%)")
        return teacher
    train, _ = mnist_loaders(seed=1000 + seed)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(jitter(x)), y)

    t0 = time.perf_counter()
    def report(epoch, record):
        if epoch % 10 == 0 or epoch == epochs:
            log(f"    teacher {seed} epoch {epoch}/{epochs}: loss {record['loss']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")

    fit(teacher, train, epochs=epochs, lr=1e-3, loss_fn=loss_fn, scheduler="cosine",
        seed=1000 + seed, progress=False, on_epoch_end=report)
    teacher.eval()
    torch.save(teacher.state_dict(), path)
    log(f"  teacher {seed}: trained {epochs} epochs in {time.perf_counter() - t0:.0f} s, "
        f"{100 * evaluate(teacher, test_loader):.2f}%")
    return teacher


def labels_only(seed: int, epochs: int, loader, lr: float) -> torch.nn.Module:
    student = mlp_student(STUDENT_HIDDEN, seed=seed)
    fit(student, loader, epochs=epochs, lr=lr, seed=seed, progress=False)
    return student


def distilled(seed: int, teachers, loader, epochs: int, T: float, alpha: float | None, lr: float):
    student = mlp_student(STUDENT_HIDDEN, seed=seed)
    cfg = DistillConfig(teachers=teachers, loader=loader, epochs=epochs, T=T, alpha=alpha, lr=lr,
                        seed=seed, progress=False)
    return compress(student, cfg)


def mean(v):
    return statistics.fmean(v)


def sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def part_labels(a, teacher, test):
    rows = []
    for s in range(a.seeds):
        t0 = time.perf_counter()
        base = labels_only(s, a.epochs, mnist_loaders(seed=s)[0], a.lr)
        r = distilled(s, [teacher], mnist_loaders(seed=s)[0], a.epochs, a.T, a.alpha, a.lr)
        acc_b, acc_d = evaluate(base, test), evaluate(r.model, test)
        rows.append({"seed": s, "labels_only": acc_b, "distilled": acc_d, "gain_points": 100 * (acc_d - acc_b)})
        log(f"  seed {s}: labels only {100 * acc_b:.2f}%  distilled {100 * acc_d:.2f}%  "
            f"gain {100 * (acc_d - acc_b):+.2f} pts  ({time.perf_counter() - t0:.0f} s)")
    gains = [r["gain_points"] for r in rows]
    return {"rows": rows, "mean_labels_only": mean([r["labels_only"] for r in rows]),
            "mean_distilled": mean([r["distilled"] for r in rows]),
            "mean_gain_points": mean(gains), "sd_gain_points": sd(gains),
            "seeds_improved": sum(g > 0 for g in gains), "target_gain_points": 0.5,
            "met": mean(gains) >= 0.5}


def part_unseen(a, teacher, test, cls: int = 3):
    rows = []
    for s in range(a.unseen_seeds):
        t0 = time.perf_counter()
        loader, _ = mnist_loaders(seed=s, exclude_classes=[cls])
        student = mlp_student(STUDENT_HIDDEN, seed=s)
        cfg = DistillConfig(teachers=[teacher], loader=loader, epochs=a.epochs, T=a.unseen_T,
                            soft_only=True, lr=a.lr, seed=s, progress=False, bias_adjust=cls)
        r = compress(student, cfg, evaluator=test)
        pc = r.tables["per_class"].set_index("class")
        unadj, adj = float(pc.loc[cls, "student"]), float(pc.loc[cls].iloc[-1])
        # overall accuracy before the adjustment, from the per-class table (100 test digits each)
        n = pc["n"]
        overall_unadj = float((pc["student"] * n).sum() / n.sum())
        overall_adj = evaluate(r.model, test)
        rows.append({"seed": s, "class": cls, "class_acc_unadjusted": unadj,
                     "class_acc_adjusted": adj, "bias_raise": r.extra["bias_raise"],
                     "overall_unadjusted": overall_unadj, "overall_adjusted": overall_adj,
                     "transfer_acc_other": r.extra["transfer_accuracy_other_classes"],
                     "transfer_acc_other_adjusted": r.extra["transfer_accuracy_other_classes_adjusted"]})
        log(f"  seed {s}: {cls}s right {100 * unadj:.1f}% -> {100 * adj:.1f}% after raise "
            f"{r.extra['bias_raise']:.2f}; overall {100 * overall_unadj:.2f}% -> "
            f"{100 * overall_adj:.2f}%  ({time.perf_counter() - t0:.0f} s)")
    u = mean([r["class_acc_unadjusted"] for r in rows])
    ad = mean([r["class_acc_adjusted"] for r in rows])
    return {"rows": rows, "T": a.unseen_T, "mean_class_acc_unadjusted": u,
            "mean_class_acc_adjusted": ad, "target_unadjusted": 0.45, "target_adjusted": 0.75,
            "met": u >= 0.45 and ad >= 0.75}


def part_ensemble(a, teachers, test):
    accs = [evaluate(t, test) for t in teachers]
    best = max(range(len(teachers)), key=lambda i: accs[i])
    log(f"  teachers: {', '.join(f'{100 * x:.2f}%' for x in accs)}; best single: teacher {best}")
    rows = []
    for s in range(a.seeds):
        t0 = time.perf_counter()
        r1 = distilled(s, [teachers[best]], mnist_loaders(seed=s)[0], a.epochs, a.T, a.alpha, a.lr)
        r3 = distilled(s, teachers, mnist_loaders(seed=s)[0], a.epochs, a.T, a.alpha, a.lr)
        a1, a3 = evaluate(r1.model, test), evaluate(r3.model, test)
        rows.append({"seed": s, "best_single": a1, "ensemble": a3, "gain_points": 100 * (a3 - a1)})
        log(f"  seed {s}: best single teacher {100 * a1:.2f}%  ensemble of {len(teachers)} "
            f"{100 * a3:.2f}%  gain {100 * (a3 - a1):+.2f} pts  ({time.perf_counter() - t0:.0f} s)")
    gains = [r["gain_points"] for r in rows]
    return {"rows": rows, "teacher_accuracies": accs, "best_teacher": best,
            "mean_best_single": mean([r["best_single"] for r in rows]),
            "mean_ensemble": mean([r["ensemble"] for r in rows]),
            "mean_gain_points": mean(gains), "sd_gain_points": sd(gains), "met": mean(gains) >= 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="student epochs (default 100)")
    p.add_argument("--seeds", type=int, default=5, help="seeds for parts labels and ensemble")
    p.add_argument("--unseen-seeds", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--teacher-hidden", default="300,100", help="teacher hidden sizes (default 300,100)")
    p.add_argument("--teacher-dropout", type=float, default=0.2)
    p.add_argument("--teachers", type=int, default=3, help="ensemble size")
    p.add_argument("-T", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--unseen-T", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--parts", default="labels,unseen,ensemble")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the students")
    p.add_argument("--teacher-threads", type=int, default=1, help="torch threads for the teachers")
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                       "nbcompress-distill-bench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.json"))
    a = p.parse_args(argv)
    global TEACHER_HIDDEN, TEACHER_DROPOUT
    TEACHER_HIDDEN = tuple(int(h) for h in a.teacher_hidden.split(","))
    TEACHER_DROPOUT = a.teacher_dropout
    torch.set_num_threads(a.threads)
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    out = {"benchmark": "distill", "settings": vars(a) | {"student_hidden": STUDENT_HIDDEN},
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(), "threads": a.threads},
           "parts": {}}
    out_path = Path(a.out)
    if out_path.exists():           # keep parts measured by an earlier run with other --parts
        try:
            prev = json.loads(out_path.read_text())
            out["parts"] = {k: v for k, v in prev.get("parts", {}).items() if k not in parts}
        except (ValueError, OSError):
            pass
    _, test = mnist_loaders()
    t_start = time.perf_counter()
    log(f"teachers (784-{'-'.join(map(str, TEACHER_HIDDEN))}-10, dropout {TEACHER_DROPOUT:g}, 2-px jitter, "
        f"{a.teacher_epochs} epochs):")
    torch.set_num_threads(a.teacher_threads)
    teachers = [train_teacher(0, a.teacher_epochs, cache, test)]
    torch.set_num_threads(a.threads)
    t_params = sum(p.numel() for p in teachers[0].parameters())
    s_params = sum(p.numel() for p in mlp_student(STUDENT_HIDDEN).parameters())
    out["teacher_params"], out["student_params"] = t_params, s_params
    log(f"student 784-{'-'.join(map(str, STUDENT_HIDDEN))}-10: {s_params:,} params, "
        f"{t_params / s_params:.0f}x smaller than a teacher ({t_params:,})")

    def save():
        out["seconds"] = time.perf_counter() - t_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2))

    if "labels" in parts:
        log(f"\n[1] distilled vs labels only: {a.epochs} epochs, T={a.T:g}, alpha={a.alpha:g}, "
            f"{a.seeds} seeds")
        out["parts"]["labels"] = res = part_labels(a, teachers[0], test)
        log(f"  mean: labels only {100 * res['mean_labels_only']:.2f}%, distilled "
            f"{100 * res['mean_distilled']:.2f}%, gain {res['mean_gain_points']:+.2f} +- "
            f"{res['sd_gain_points']:.2f} pts ({res['seeds_improved']}/{a.seeds} seeds better); "
            f"target +0.5: {'MET' if res['met'] else 'NOT MET'}")
        save()
    if "unseen" in parts:
        log(f"\n[2] unseen class 3: soft targets only, T={a.unseen_T:g}, {a.epochs} epochs, "
            f"{a.unseen_seeds} seeds")
        out["parts"]["unseen"] = res = part_unseen(a, teachers[0], test)
        log(f"  mean: 3s right {100 * res['mean_class_acc_unadjusted']:.1f}% unadjusted "
            f"(target 45%), {100 * res['mean_class_acc_adjusted']:.1f}% adjusted (target 75%): "
            f"{'MET' if res['met'] else 'NOT MET'}")
        save()
    if "ensemble" in parts:
        log(f"\n[3] ensemble of {a.teachers} vs best single teacher: {a.epochs} epochs, "
            f"T={a.T:g}, alpha={a.alpha:g}, {a.seeds} seeds")
        torch.set_num_threads(a.teacher_threads)
        teachers += [train_teacher(k, a.teacher_epochs, cache, test) for k in range(1, a.teachers)]
        torch.set_num_threads(a.threads)
        out["parts"]["ensemble"] = res = part_ensemble(a, teachers, test)
        log(f"  mean: best single {100 * res['mean_best_single']:.2f}%, ensemble "
            f"{100 * res['mean_ensemble']:.2f}%, gain {res['mean_gain_points']:+.2f} +- "
            f"{res['sd_gain_points']:.2f} pts; target >= 0: {'MET' if res['met'] else 'NOT MET'}")
        save()
    out["teacher_accuracies"] = [evaluate(t, test) for t in teachers]
    save()
    log(f"\nwrote {out_path} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
