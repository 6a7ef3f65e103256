"""The ``jaxsloth`` command line: ``demo`` (built-in tiny run), ``train``, ``export``."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from jaxsloth.demo import run_demo

    run_demo(args.out, steps=args.steps)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="jaxsloth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny Llama-3 checkpoint and run the built-in demo on it")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
