"""Command line: ``python -m nbcompress demo [--epochs N]``; ``python -m nbcompress magics`` prints
the README's table of technique magics (from the registry)."""
from __future__ import annotations

import sys

USAGE = "usage: python -m nbcompress demo [--epochs N] [--seed S] [--progress] | magics"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "magics":
        from .magics.technique import magic_table

        print(magic_table(), end="")
        return 0
    print(f"unknown command {argv[0]!r}; try: python -m nbcompress demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
