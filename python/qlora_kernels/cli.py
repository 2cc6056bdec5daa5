"""`qlora-kernels` / `python -m qlora_kernels`: env, bench, demo."""

from __future__ import annotations

import argparse
import json
import sys


def _env(args: argparse.Namespace) -> int:
    from .env import backends

    print(json.dumps(backends(), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    run(args.what, quick=args.quick, out_dir=args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(size=args.size)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="what was compiled and what is usable here")
    p.set_defaults(fn=_env)

    p = sub.add_parser("bench", help="microbenchmarks vs what users run today; writes benchmarks/results/*.json")
    p.add_argument("what", nargs="?", default="all", choices=["nf4", "lora", "attention", "all"])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--out", default="benchmarks/results", help="folder for the results JSON")
    p.set_defaults(fn=_bench)

    p = sub.add_parser("demo", help="quantize a Llama-shaped random model, round-trip it through bitsandbytes, bench")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="model size preset")
    p.set_defaults(fn=_demo)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
