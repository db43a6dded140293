"""``kvstore demo pd``: prefill/decode disaggregation with a real transformer (kvstore.demo.pd).

A thin front: the arguments and the run live in :mod:`kvstore.demo.pd`, which
needs the ``demo`` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from kvstore import config as kvconfig

DEMOS = {"pd": "prefill and decode in two processes through kvstore; --bench measures time to first token"}


def add_arguments(parser: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    sub = parser.add_subparsers(dest="demo", required=True, metavar="DEMO")
    pd = sub.add_parser("pd", parents=parents, help=DEMOS["pd"], description=DEMOS["pd"])
    from kvstore.demo import pd as pd_demo

    pd_demo.add_arguments(pd)


def run(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"kvstore demo: {' and '.join(missing)} not installed: pip install 'kvstore[demo]'",
            file=sys.stderr,
        )
        return 1
    from kvstore.demo import pd as pd_demo

    return pd_demo.run_cli(args, cfg)
