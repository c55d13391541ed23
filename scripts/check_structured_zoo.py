"""Issue 15, part 5: ``nbcompress.prune(m, 0.3, structured=True, example_input=x)`` over every
torchvision classification model and the timm families below, random weights, small inputs.
A model passes when the pruned copy runs on the input, has fewer parameters and the original is
unchanged; a refusal must be one line (a BadInput / FieldError). Prints a table, one line per
failure or refusal, and the pass counts. Needs torchvision and timm (e.g. the /tmp/v214 venv).

Run: nice python scripts/check_structured_zoo.py [--only tv|timm] [--limit 60] [NAME ...]
"""
from __future__ import annotations

import argparse
import signal
import time
import warnings

import torch

warnings.filterwarnings("ignore")

TIMM = ["resnet18", "resnext26ts", "regnetx_002", "regnety_002", "efficientnet_b0",
        "mobilenetv3_small_100", "convnext_atto", "convnextv2_atto", "ghostnet_100",
        "res2net50_14w_8s", "cspresnet50", "dla34", "densenet121", "dpn68", "hrnet_w18_small",
        "inception_v3", "mixer_s16_224", "repvgg_a0", "rexnet_100", "tinynet_a",
        "edgenext_xx_small", "poolformer_s12", "nf_resnet26", "resnest14d", "skresnet18",
        "selecsls42b", "ese_vovnet19b_dw", "hardcorenas_a", "lcnet_050", "fbnetc_100",
        "mobilevit_xxs", "efficientformer_l1", "ghostnetv2_100", "mobileone_s0",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224"]
# families whose attention belongs to the transformer part of issue 15 (heads, not channels)
ATTENTION = ("vit_", "swin_", "maxvit_", "deit_", "mobilevit", "efficientformer")


def _size(name: str) -> int:
    n = name.lower()
    if n.startswith(("vit_", "swin", "maxvit", "deit", "mixer", "efficientformer")):
        return 224
    if "inception" in n:
        return 75 if not n.startswith("inception_v3") or "tv" in n else 75
    if n.startswith(("mobilevit",)):
        return 256
    return 64


def _build(src: str, name: str):
    if src == "tv":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") \
            else {}
        return torchvision.models.get_model(name, weights=None, **kw)
    import timm
    return timm.create_model(name, pretrained=False)


class _Timeout(BaseException):   # not swallowed by an except Exception inside
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check(src: str, name: str, limit: int) -> tuple[str, str, float]:
    """('pass' | 'refused' | 'FAIL' | 'slow', detail, seconds)."""
    import nbcompress
    from nbcompress.errors import BadInput, FieldError

    torch.manual_seed(0)
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        m = _build(src, name).eval()
        s = _size(name)
        x = torch.randn(1, 3, s, s)
        with torch.no_grad():
            try:
                m(x)
            except Exception:  # noqa: BLE001 - a bigger input then
                s = 224
                x = torch.randn(1, 3, s, s)
                m(x)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        p0 = sum(p.numel() for p in m.parameters())
        try:
            out = nbcompress.prune(m, 0.3, structured=True, example_input=x)
        except (BadInput, FieldError) as e:
            msg = str(e)
            same = all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and \
                set(before) == set(m.state_dict())
            kind = "refused" if "\n" not in msg.strip() and same else "FAIL"
            return kind, ("" if same else "[model changed] ") + msg.strip().splitlines()[0][:200], \
                time.perf_counter() - t0
        p1 = sum(p.numel() for p in out.parameters())
        with torch.no_grad():
            y = out.eval()(x)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if not p1 < p0:
            return "FAIL", f"not smaller ({p0:,} -> {p1:,})", time.perf_counter() - t0
        if not torch.isfinite(y).all():
            return "FAIL", "non-finite output", time.perf_counter() - t0
        return "pass", f"{p0:,} -> {p1:,} ({p1 / p0:.0%})", time.perf_counter() - t0
    except _Timeout:
        return "slow", f"over {limit} s", time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a traceback is a failure
        return "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:180] if str(e) else ''}", \
            time.perf_counter() - t0
    finally:
        signal.alarm(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tv", "timm"])
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    todo = []
    if a.only in (None, "tv"):
        import torchvision
        todo += [("tv", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if a.only in (None, "timm"):
        todo += [("timm", n) for n in TIMM]
    if a.names:
        todo = [(s, n) for s, n in todo if n in a.names]
    torch.set_num_threads(1)
    tally: dict[str, dict[str, int]] = {}
    for src, name in todo:
        kind, detail, sec = check(src, name, a.limit)
        scope = "attn" if name.startswith(ATTENTION) or name.startswith(("swin", "maxvit")) \
            else "cnn"
        t = tally.setdefault(src, {})
        t[kind] = t.get(kind, 0) + 1
        t["total"] = t.get("total", 0) + 1
        if scope == "cnn":
            t["cnn_total"] = t.get("cnn_total", 0) + 1
            t["cnn_pass"] = t.get("cnn_pass", 0) + (kind == "pass")
        print(f"{src:4} {name:28} {kind:7} {sec:6.1f}s {'(attention) ' if scope == 'attn' else ''}"
              f"{detail}", flush=True)
    for src, t in tally.items():
        print(f"{src}: {t.get('pass', 0)}/{t['total']} pass ({t.get('cnn_pass', 0)}/"
              f"{t.get('cnn_total', 0)} outside attention models), {t.get('refused', 0)} refused "
              f"in one line, {t.get('FAIL', 0)} fail, {t.get('slow', 0)} over the limit")


if __name__ == "__main__":
    main()
