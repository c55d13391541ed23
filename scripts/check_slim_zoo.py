"""%slim on models the project did not write (issue 17): for each, plan widths 0.5 / 1 (and
depths 0.5 / 1 where it has residual blocks), check the reorder left the full network's output as
it was, run the sliced width-0.5 forward and check it equals the plain network ``at_width(0.5)``
cuts out, and report the FLOPs share and the planner's notes (channel groups left whole); or the
one-line reason it is refused. Random weights, no download.

    python scripts/check_slim_zoo.py                  # torchvision + timm + transformers
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbcompress.counting import count_flops  # noqa: E402
from nbcompress.techniques.slim.model import SlimmableNet  # noqa: E402
from nbcompress.techniques.slim.plan import plan_widths, residual_blocks  # noqa: E402

TV = ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn", "alexnet",
      "densenet121", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
      "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_0", "regnet_x_400mf", "convnext_tiny",
      "vit_b_16", "swin_t"]
TIMM = ["resnet18", "resnet50d", "vgg11", "densenet121", "mobilenetv3_small_050",
        "efficientnet_b0", "convnext_atto", "deit_tiny_patch16_224", "regnetx_002", "dla34",
        "cspresnet50", "res2net50_14w_8s"]


def check(name: str, model, x) -> dict:
    t0 = time.perf_counter()
    model.eval()
    try:
        blocks = residual_blocks(model, x)
        with torch.no_grad():
            before = model(x)
        plan = plan_widths(model, x, [0.5, 1.0])
        with torch.no_grad():
            kept = bool(torch.allclose(model(x), before, atol=1e-4, rtol=1e-3))
        sn = SlimmableNet(model, [0.5, 1.0], plan.spec, blocks=blocks).eval()
        sn.width = 0.5
        with torch.enable_grad():
            a = sn(x)
        plain = sn.at_width(0.5).eval()
        with torch.no_grad():
            b = plain(x)
        same = bool(torch.allclose(a, b, atol=1e-4, rtol=1e-3))
        share = count_flops(plain, x)[0] / max(1, count_flops(model, x)[0])
        return {"model": name, "ok": same and kept, "full_unchanged": kept,
                "flops_at_0.5": round(share, 3), "residual_blocks": len(blocks),
                "notes": [n[:200] for n in plan.notes],
                "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - the reason, in one line
        return {"model": name, "ok": False, "refused": f"{type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}",
                "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    import torchvision

    for n in TV:
        size = 224 if n in ("vit_b_16", "swin_t") else 64
        m = getattr(torchvision.models, n)(num_classes=10, **({"aux_logits": False,
                                                               "init_weights": False}
                                                              if n == "googlenet" else {}))
        rows.append(check(f"torchvision {n}", m, torch.randn(1, 3, size, size)))
        print(rows[-1], flush=True)
    import timm

    for n in TIMM:
        m = timm.create_model(n, pretrained=False, num_classes=10)
        size = 224 if "deit" in n else 64
        rows.append(check(f"timm {n}", m, torch.randn(1, 3, size, size)))
        print(rows[-1], flush=True)
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=128,
                                                    vocab_size=100))
    ids = torch.randint(0, 100, (1, 16))

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x).logits

    rows.append(check("transformers BERT (tiny config)", Logits(bert), ids))
    print(rows[-1], flush=True)
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "slim_zoo.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    ok = sum(r["ok"] for r in rows)
    print(f"{ok}/{len(rows)} slim; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
