"""`python -m losa_deploy.sparse_cpu.build`: compile the kernel library if needed (toolchain.py), load it (_lib.py)
and print its path, version and the instruction sets this CPU can use. `make setup` runs it.

Why a module of its own: it is the one place that needs both the compiler side and the loaded library, so
neither of those two imports the other to report on itself.
"""

from __future__ import annotations

import sys

from ..errors import UserError
from . import _lib
from .toolchain import build


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build(force="--force" in args)
        lib = _lib.load(path)
        print(f"{path}")
        print(f"version: {lib.sp_version().decode()}; ISAs on this CPU: {', '.join(_lib.available_isas())}; "
              f"selected: {_lib.get_isa()}; threads: {_lib.get_threads()}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
