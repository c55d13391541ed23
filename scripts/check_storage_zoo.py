"""Issue 15, part 2: nbcompress.save -> nbcompress.load over library models (random weights, no
download): 6 Hugging Face architectures from small configs, every torchvision classification
model and one small model per timm family. A model passes when the loaded model is the same class,
has the same parameter names and shapes (tied ones tied again) and gives bit-identical outputs in
eval mode on the same input (after an eval forward of the original, so lazy caches are filled).
Prints one line per model (PASS, or FAIL with a one-line reason) and a pass-rate summary.

Run (timm / torchvision need the torch 2.14 venv):
    . /tmp/v214/bin/activate
    nice python scripts/check_storage_zoo.py hf timm torchvision --json /tmp/zoo.json
    nice python scripts/check_storage_zoo.py torchvision --part 2/3     # a third of the list
    python scripts/check_storage_zoo.py timm --only levit_128s,convnext_atto
"""
from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, ".")
from nbcompress.errors import BadInput  # noqa: E402
from nbcompress.storage import load, save  # noqa: E402

TIMM = ("resnet18 efficientnet_b0 mobilenetv3_small_100 convnext_atto vit_tiny_patch16_224 "
        "deit_tiny_patch16_224 swin_tiny_patch4_window7_224 regnetx_002 resnext26ts dla34 "
        "densenet121 ghostnet_100 mixer_s16_224 res2net50_14w_8s cspresnet50 edgenext_xx_small "
        "efficientformer_l1 levit_128s poolformer_s12 repvgg_a0 rexnet_100 tinynet_a "
        "xcit_nano_12_p16_224 coat_lite_tiny maxvit_tiny_tf_224 mobilevit_xxs hrnet_w18_small "
        "inception_v3 efficientformerv2_s0 tiny_vit_5m_224 efficientvit_m0 pit_ti_224 "
        "cait_xxs24_224 dpn68 ese_vovnet19b_dw fastvit_t8 mobileone_s0 gcvit_xxtiny pvt_v2_b0 "
        "crossvit_tiny_240 eca_nfnet_l0 selecsls42b hgnetv2_b0 mambaout_femto").split()


def hf_models() -> dict:
    import transformers as tf
    tf.logging.set_verbosity_error()
    c = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    whisper = dict(vocab_size=200, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   decoder_start_token_id=1, d_model=64, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                   decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32,
                   max_target_positions=32)
    return {
        "bert": (lambda: tf.BertForMaskedLM(tf.BertConfig(vocab_size=200, **c)),
                 {"input_ids": ids}),
        "distilbert": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=200, dim=64, n_layers=2, n_heads=2, hidden_dim=128)), {"input_ids": ids}),
        "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=200, n_embd=64, n_layer=2,
                                                          n_head=2, n_positions=64)),
                 {"input_ids": ids}),
        "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=200, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)),
            {"input_ids": ids, "decoder_input_ids": ids[:, :5]}),
        "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
            image_size=32, patch_size=8, num_labels=5, **c)),
            {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}),
        "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(**whisper)),
                    {"input_features": torch.randn(2, 16, 64),
                     "decoder_input_ids": ids[:, :5]}),
    }


def tensors_of(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in tensors_of(v)]
    return []


def same_bits(a, b) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            x, y = x.contiguous().view(ints), y.contiguous().view(ints)
        if not torch.equal(x, y):
            return False
    return True


def run(model, call) -> object:
    with torch.no_grad():
        return call(model)


def roundtrip(make, inputs) -> tuple[bool | None, str, int]:
    """(passed, reason, file bytes); passed is None when ``make`` (a compression step) refused."""
    torch.manual_seed(0)
    try:
        model = make().eval()
    except BadInput as e:
        return None, f"the step refused: {e}", 0
    call = None
    for x in inputs:
        fn = (lambda m, x=x: m(**x)) if isinstance(x, dict) else (lambda m, x=x: m(x))
        try:
            y0 = run(model, fn)
            call = fn
            break
        except Exception as e:  # noqa: BLE001 - try the next input size
            err = e
    if call is None:
        return False, f"the original does not run: {type(err).__name__}: {err}", 0
    buf = io.BytesIO()
    try:
        n = save(model, buf)
    except BadInput as e:
        return False, f"save refused: {e}", 0
    try:
        loaded = load(io.BytesIO(buf.getvalue())).eval()
    except BadInput as e:
        return False, f"load refused: {e}", n
    if type(loaded) is not type(model):
        return False, f"loaded a {type(loaded).__name__}", n
    shapes = [(k, tuple(p.shape)) for k, p in model.named_parameters(remove_duplicate=False)]
    if shapes != [(k, tuple(p.shape)) for k, p in loaded.named_parameters(remove_duplicate=False)]:
        return False, "parameter names / shapes differ", n
    if len(list(model.parameters())) != len(list(loaded.parameters())):
        return False, "tied parameters not tied again", n
    try:
        y1 = run(loaded, call)
    except Exception as e:  # noqa: BLE001 - a loaded model that does not run is a failure
        return False, f"the loaded model does not run: {type(e).__name__}: {str(e)[:150]}", n
    if not same_bits(y0, y1):
        if not same_bits(run(model, call), y0):
            return False, "the original is not deterministic", n
        return False, "outputs differ", n
    return True, "", n


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout


def zoo(kinds: list[str], only: set[str] | None) -> list[tuple[str, str, object, list]]:
    out = []
    if "hf" in kinds:
        import nbcompress
        for name, (make, x) in hf_models().items():
            out.append(("hf", name, make, [x]))
            # compressed versions: the file records the shapes the step left
            out.append(("hf", f"{name}/structured", lambda make=make, x=x: nbcompress.prune(
                make().eval(), 0.5, structured=True, example_input=x), [x]))
            out.append(("hf", f"{name}/lowrank", lambda make=make, x=x: nbcompress.lowrank(
                make().eval(), rank=8, example_input=x), [x]))
    if "timm" in kinds:
        import timm
        for name in TIMM:
            cfg = timm.get_pretrained_cfg(name)
            size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
            xs = [torch.randn(1, 3, 64, 64), torch.randn(1, *size)]
            out.append(("timm", name, lambda n=name: timm.create_model(n, pretrained=False), xs))
    if "torchvision" in kinds:
        import torchvision.models as tvm
        for name in tvm.list_models(module=tvm):
            xs = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 224, 224),
                  torch.randn(1, 3, 299, 299)]
            out.append(("torchvision", name,
                        lambda n=name: tvm.get_model(n, weights=None), xs))
    g = torch.Generator().manual_seed(1)
    for _, _, _, xs in out:                      # the same inputs on every run
        for i, x in enumerate(xs):
            if isinstance(x, torch.Tensor):
                xs[i] = torch.randn(x.shape, generator=g)
    return [z for z in out if only is None or z[1] in only]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kinds", nargs="+", choices=["hf", "timm", "torchvision"])
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--part", default="1/1", help="K/N: the K-th of N slices of the list")
    ap.add_argument("--timeout", type=int, default=180, help="seconds per model")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    only = set(a.only.split(",")) if a.only else None
    k, n = (int(v) for v in a.part.split("/"))
    todo = zoo(a.kinds, only)
    todo = todo[(k - 1) * len(todo) // n:k * len(todo) // n]
    signal.signal(signal.SIGALRM, _alarm)
    results = []
    for kind, name, make, xs in todo:
        t = time.perf_counter()
        signal.alarm(a.timeout)
        try:
            ok, why, nbytes = roundtrip(make, xs)
        except _Timeout:
            ok, why, nbytes = False, f"over {a.timeout} s", 0
        except Exception as e:  # noqa: BLE001 - a traceback is a failure of the tool too
            ok, why, nbytes = False, f"TRACEBACK {type(e).__name__}: {e}", 0
        finally:
            signal.alarm(0)
        sec = time.perf_counter() - t
        why = " ".join(str(why).split())[:220]
        verdict = "PASS" if ok else "SKIP" if ok is None else "FAIL"
        print(f"{kind:11s} {name:34s} {verdict} {nbytes / 1e6:8.2f} MB "
              f"{sec:6.1f}s {why}", flush=True)
        results.append({"kind": kind, "model": name, "pass": ok, "reason": why,
                        "bytes": nbytes, "seconds": round(sec, 2)})
    for kind in a.kinds:
        rs = [r for r in results if r["kind"] == kind]
        if rs:
            tried = [r for r in rs if r["pass"] is not None]
            print(f"{kind}: {sum(r['pass'] for r in tried)}/{len(tried)} pass"
                  + (f" ({len(rs) - len(tried)} not tried: the compression step refused)"
                     if len(tried) < len(rs) else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
