"""``kvstore``: the admin command line.

    kvstore up [--port 50051] [--dram 1GiB] [--shm-dir /dev/shm] [--demo]
    kvstore nodes | stats | namespaces [--json]
    kvstore evict (--namespace NS [--tokens T,... | --key HEX] | --node ID | --tier T | --all)
    kvstore pin|unpin --namespace NS (--tokens T,... | --key HEX) [--ttl-s S]
    kvstore drain NODE [--force] [--cancel] [--no-wait]
    kvstore config [--remote]
    kvstore demo pd [--bench] [--model small|8b] [--device cpu|cuda] [--own-cluster]
    kvstore bench [--quick] [--parts throughput,redis,control,memory,latency] [--sizes 64KiB,1MiB] [--json FILE]

The master comes from ``--master`` (before or after the subcommand), else
``KVSTORE_MASTER``, else the config file, else 127.0.0.1:50051.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kvstore import config as kvconfig
from kvstore import logs
from kvstore.errors import KVStoreError

Command = Callable[[argparse.Namespace, kvconfig.Config], int]


def _connection_flags(suppress: bool) -> argparse.ArgumentParser:
    """--config, --master, --rpc-timeout-ms, --log-level, from the settings table.

    On subcommands they default to SUPPRESS, so ``kvstore --master X nodes`` is
    not overwritten by the subcommand's own (absent) flag.
    """
    parent = argparse.ArgumentParser(add_help=False)
    kvconfig.add_flags(parent, kvconfig.CLI)
    if suppress:
        for action in parent._actions:  # argparse offers no public way to change defaults to SUPPRESS
            action.default = argparse.SUPPRESS
    return parent


def _json_flag(suppress: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON for scripts instead of tables",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    from kvstore.bench import runner as bench
    from kvstore.cli import admin, demo, tiers, up

    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="Admin tool of the kvstore KV-cache store.",
        parents=[_connection_flags(False), _json_flag(False)],
    )
    conn, as_json = _connection_flags(True), _json_flag(True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Command, help_text: str, json_output: bool = True
    ) -> argparse.ArgumentParser:
        parents = [conn, as_json] if json_output else [conn]
        p = sub.add_parser(name, parents=parents, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    up.add_arguments(
        command("up", up.run, "start a single-machine cluster (master + one DRAM node)", json_output=False)
    )
    command("nodes", admin.cmd_nodes, "list storage nodes")
    command("stats", admin.cmd_stats, "capacity, use, pages and hit rate per node and tier")
    command("namespaces", admin.cmd_namespaces, "list namespaces")
    evict = command(
        "evict",
        admin.cmd_evict,
        "evict every unleased page in scope: a namespace, a prefix, a node, a tier, or all",
    )
    evict.add_argument("--namespace", help="namespace to empty")
    evict.add_argument("--all", action="store_true", help="every namespace")
    # tiers: narrower scopes (combined with AND)
    tiers.add_prefix_arguments(evict, required=False)
    evict.add_argument("--node", help="only pages on this node")
    evict.add_argument("--tier", choices=("dram", "nvme", "vram"), help="only pages in this tier")
    tiers.add_commands(command)
    config_cmd = command("config", admin.cmd_config, "print the effective configuration as TOML")
    config_cmd.add_argument(
        "--remote", action="store_true", help="the master's configuration instead of this shell's"
    )
    bench.add_arguments(
        command(
            "bench",
            bench.run,
            "measure the store beside the machine's limits (throughput, Redis, control plane, memory, latency)",
            json_output=False,
        )
    )
    demo.add_arguments(
        command(
            "demo",
            demo.run,
            "run a demo against the store (pd: prefill/decode with a real transformer)",
            json_output=False,
        ),
        [conn],
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = kvconfig.from_args(args)
    logs.setup(cfg.log_level, component="kvstore")
    handler: Command = args.handler
    try:
        return handler(args, cfg)
    except KVStoreError as exc:
        print(f"kvstore {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
