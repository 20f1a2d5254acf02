"""`python -m valle_jax.kernels build [--isa avx2|avx512]`: builds the CPU decoding kernels ahead of
time (a container image, a shared cache), so no process builds them on first use;
`python -m valle_jax.kernels status` says whether this machine can use them, and where they are."""

from __future__ import annotations

import argparse
import logging
import sys

from valle_jax import kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valle_jax.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "status"))
    parser.add_argument("--isa", choices=tuple(kernels.ISAS), help="build this instruction set (default: the widest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    isa = args.isa or kernels.isa()
    if isa is None:
        print(f"the CPU decoding kernels cannot run here: {kernels.cpu_supported()}", file=sys.stderr)
        return 1
    if args.command == "status" and not kernels.library_path(isa).exists():
        print(
            f"not built yet for {isa} (would be {kernels.library_path(isa)}); "
            "the first process to decode on the CPU builds it"
        )
        return 0
    reason = kernels.unavailable_reason(isa)
    if reason is not None:
        print(f"the CPU decoding kernels are unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"{isa} kernels ready: {kernels.library_path(isa)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
