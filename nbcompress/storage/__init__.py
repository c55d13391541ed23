"""Safe, compact model files: :func:`save`, :func:`load`, :func:`describe`, :func:`breakdown`.

A file holds the whole model (architecture included) and loading it never unpickles anything.
The file format is described in :mod:`nbcompress.storage.format`; the package's parts:

* :mod:`.bits`: bit packing and canonical, length-limited Huffman codes (numpy only);
* :mod:`.codec`: a tensor's elements packed losslessly into five segments, the smallest of the
  position and value encodings chosen by exact size;
* :mod:`.format`: the header, its CRC-32, the registry of module codecs, reading a file,
  :func:`describe` and :func:`overhead_bytes`;
* :mod:`.names`: what a file may name (classes, functions, Enums, library configs) and the trust
  rules that turn a name back into a class on load;
* :mod:`.pack`: one stored tensor's packing, remembered per tensor (:data:`nbcompress.fingerprint.MEMO`)
  while its values stay, and the CRC-32 combination that lets :func:`packed_size` skip the bytes;
* :mod:`.saver`: :func:`save`, :func:`packed_size` and :func:`breakdown`; :mod:`.loader`: :func:`load`.
"""
from .codec import MAX_CODEBOOK
from .format import FORMAT_VERSION, MAGIC, describe, overhead_bytes, register_module_codec
from .loader import load
from .names import SAFE_PREFIXES
from .saver import breakdown, packed_size, save

__all__ = ["save", "load", "describe", "breakdown", "packed_size", "register_module_codec", "MAGIC",
           "SAFE_PREFIXES", "overhead_bytes", "FORMAT_VERSION", "MAX_CODEBOOK"]
