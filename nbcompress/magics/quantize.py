"""%quantize: int8 with real kernels, fp16/bf16, k-bit uniform, weight clustering (+ Huffman),
binary weights, and quantization-aware training."""
from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..quantize import MODES, QuantizeConfig
from .base import NBMagics, step_options, user_errors


@magics_class
class QuantizeMagics(NBMagics):

    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name", help="the variable holding the model (dotted names like model.encoder work)")
    @argument("--bits", type=int, default=None, metavar="B",
              help="bits per weight, 1..8 (int8 modes: 8; uniform default 8, cluster 5, "
                   "binary 1); --bits below 8 without --mode means uniform")
    @argument("--mode", default=None, metavar="|".join(MODES),
              help="dynamic: int8 weights, activations quantized on the fly (Linear, LSTM, "
                   "GRU); static: int8 weights and activations calibrated with --calib (conv + "
                   "Linear); "
                   "uniform: B-bit codes, stored packed; cluster: k-means weight sharing "
                   "(Deep Compression); binary: sign(w) * per-channel scale. Default: the "
                   "fastest real int8 kernel for the model's layers")
    @argument("--dtype", default=None, metavar="fp16|bf16",
              help="cast weights and activations to fp16 or bf16 instead")
    @argument("--per-channel", action="store_true",
              help="one scale per output channel (default: one per tensor)")
    @argument("--asymmetric", action="store_true",
              help="uniform codes with a zero point (default: symmetric around 0)")
    @argument("--huffman", action="store_true",
              help="Huffman-code the stored indices/codes (and sparse positions) of the "
                   "quantized layers when that is smaller")
    @argument("--calib", default=None, metavar="LOADER",
              help="DataLoader whose batches set the activation ranges for static int8")
    @argument("--calib-batches", type=int, default=16, metavar="N",
              help="how many --calib batches to use (default 16)")
    @argument("--qat", default=None, metavar="LOADER",
              help="quantization-aware training on this DataLoader (uniform, cluster, binary)")
    @argument("--epochs", type=int, default=None, metavar="E", help="QAT epochs (default 1)")
    @argument("--lr", type=float, default=None,
              help="QAT learning rate (Adam; default 1e-4, binary 1e-3)")
    @argument("--layers", default=None, metavar="REGEX",
              help="only layers whose name matches this regular expression (re.search)")
    @argument("--seed", type=int, default=0, help="seed for QAT")
    @step_options
    def quantize(self, line="", local_ns=None):
        """Quantize a model and rebind the name to the result (``%undo`` goes back).

        ``%quantize model`` alone picks int8 with the fastest real kernel for the model's layers
        on its device and says which: dynamic int8 for Linear layers, static int8 with
        ``--calib`` (convs too). ``--mode uniform/cluster/binary`` store fewer bits per weight
        (simulated in the forward pass, packed in ``nbcompress.save``). Returns the step's
        report; the storage byte split of clustered models is in ``report.result.tables``.

        Examples::

            %quantize model                                   # int8, real CPU kernels
            %quantize cnn --calib train_loader                # static int8 for a conv net
            %quantize model --bits 4 --per-channel            # 4-bit codes, stored packed
            %quantize model --mode cluster --bits 5 --huffman # Deep Compression weight sharing
            %quantize model --mode binary --qat train_loader --epochs 5
            %quantize model --dtype bf16
        """
        args = parse_argstring(self.quantize, line)
        config = QuantizeConfig(
            bits=args.bits, mode=args.mode, dtype=args.dtype, per_channel=args.per_channel,
            symmetric=not args.asymmetric, huffman=args.huffman,
            calib=self.lookup_loader(args.calib, local_ns, "--calib"),
            calib_batches=args.calib_batches,
            qat=self.lookup_loader(args.qat, local_ns, "--qat"),
            epochs=args.epochs, lr=args.lr, layers=args.layers, seed=args.seed,
            device=args.device)
        return self.run_step(args.name, config, args, local_ns, magic=f"%quantize {line}")
