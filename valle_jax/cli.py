"""The console scripts: `valle-jax COMMAND ARGS` and `valle-jax-COMMAND ARGS` run `python -m MODULE ARGS`.

Each command is a module with its own `__main__` block and argument parser, so a console script
runs that module exactly as `python -m` does (runpy, with sys.argv set) rather than calling into it:
one parser and one exit-status convention per command, and the README's `python -m` lines and the
console scripts cannot drift apart. Standard library only: setup.py reads COMMANDS from this file
when it builds the package.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

# command -> module run as `python -m`; setup.py makes a `valle-jax-COMMAND` script for each
COMMANDS = {
    "train": "valle_jax.train",
    "synthesize": "valle_jax.synthesize",
    "export": "valle_jax.export",
    "evaluate": "valle_jax.evaluate",
    "plot": "valle_jax.plot",
    "kernels": "valle_jax.kernels",
    "quantize": "tools.quantize",
    "phonemize": "tools.phonemize",
    "pack": "tools.pack",
    "make-demo-corpus": "tools.make_demo_corpus",
    "make-random-codec": "tools.make_random_codec",
    "make-test-list": "tools.make_test_list",
    "draw-batches": "tools.draw_batches",
    "convert-reference": "tools.convert_reference",
    "parity": "tools.parity",
    "demo": "tools.demo",
    "tpu": "tools.tpu",
}
PREFIX = "valle-jax-"


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  python -m {module}" for name, module in COMMANDS.items())
    return (
        "usage: valle-jax COMMAND [ARGS...]   (or valle-jax-COMMAND [ARGS...])\n\n"
        f"commands (each is the module on the right; `valle-jax COMMAND --help` for its flags):\n{rows}\n"
    )


def run(command: str, args: list[str]) -> None:
    """Runs COMMANDS[command] as `python -m` would, with `args` as its command line."""
    module = COMMANDS[command]
    sys.argv = [f"{PREFIX}{command}", *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main() -> int:
    name = Path(sys.argv[0]).name
    if name.startswith(PREFIX) and name[len(PREFIX) :] in COMMANDS:  # valle-jax-COMMAND
        run(name[len(PREFIX) :], sys.argv[1:])
        return 0
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"valle-jax: unknown command {args[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    run(args[0], args[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
