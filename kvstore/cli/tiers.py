"""Tier subcommands: ``pin``, ``unpin``, ``drain`` (and the prefix scope of ``evict``).

    kvstore pin --namespace NS (--tokens 1,2,3,... | --key HEX[,HEX...]) --ttl-s 600
    kvstore unpin --namespace NS (--tokens ... | --key ...)
    kvstore drain NODE [--force] [--cancel] [--no-wait]

A prefix is given as tokens (hashed here with the namespace's page size and
salt, exactly as a client would) or as page keys in hex (the first page key
first, or a single page key: then only that page and the pages extending it).
"""

from __future__ import annotations

import argparse
import sys
import time

from kvstore import config as kvconfig
from kvstore import keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.cli.admin import Master
from kvstore.cli.output import print_json, proto_to_dict
from kvstore.errors import ErrorCode, KVStoreError

POLL_S = 0.2
BAR_WIDTH = 30


def add_prefix_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--tokens", help="token ids of the prefix, comma separated (whole pages count)")
    group.add_argument("--key", help="page key(s) in hex, comma separated, first page first")


def prefix_keys(master: Master, namespace: str, tokens: str | None, key: str | None) -> bytes:
    """The packed page keys the --tokens / --key arguments name."""
    if key:
        try:
            raw = [bytes.fromhex(k.strip()) for k in key.split(",") if k.strip()]
        except ValueError:
            raise KVStoreError(ErrorCode.BAD_KEYS, "--key wants hexadecimal page keys") from None
        if not raw or any(len(k) != keys.KEY_BYTES for k in raw):
            raise KVStoreError(
                ErrorCode.BAD_KEYS, f"each --key must be {keys.KEY_BYTES} bytes (32 hex digits)"
            )
        return keys.pack_keys(raw)
    if not namespace:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "--tokens needs --namespace")
    try:
        token_list = [int(t) for t in (tokens or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise KVStoreError(ErrorCode.BAD_TOKENS, "--tokens wants comma-separated integers") from None
    spec = master.kvstore("GetNamespace", pb.GetNamespaceRequest(name=namespace)).spec
    root = keys.namespace_root(spec.name, spec.salt)
    page_keys = keys.page_keys(root, token_list, spec.page_size)
    if not page_keys:
        raise KVStoreError(ErrorCode.BAD_TOKENS, f"fewer tokens than one page ({spec.page_size})")
    return keys.pack_keys(page_keys)


def cmd_pin(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    with Master(cfg) as master:
        packed = prefix_keys(master, args.namespace, args.tokens, args.key)
        reply: pb.PinPrefixResponse = master.kvstore(
            "PinPrefix",
            pb.PinPrefixRequest(namespace=args.namespace, keys=packed, ttl_ms=max(1, int(args.ttl_s * 1000))),
        )
    if args.json:
        print_json(proto_to_dict(reply))
        return 0
    until = time.strftime("%H:%M:%S", time.localtime(reply.pinned_until_unix_ms / 1000))
    print(f"pinned {reply.num_pages} of {len(packed) // keys.KEY_BYTES} pages until {until}")
    return 0


def cmd_unpin(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    with Master(cfg) as master:
        packed = prefix_keys(master, args.namespace, args.tokens, args.key)
        reply: pb.PinPrefixResponse = master.kvstore(
            "UnpinPrefix", pb.UnpinPrefixRequest(namespace=args.namespace, keys=packed)
        )
    if args.json:
        print_json(proto_to_dict(reply))
    else:
        print(f"unpinned {reply.num_pages} pages")
    return 0


def _bar(reply: pb.DrainNodeResponse) -> str:
    total = max(1, reply.pages_total)
    done = min(total, reply.pages_total - min(reply.pages_total, reply.pages_left))
    filled = BAR_WIDTH * done // total
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{reply.pages_total} pages "
        f"(moved {reply.pages_moved}, left {reply.pages_left})"
    )


def cmd_drain(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    tty = sys.stdout.isatty() and not args.json
    with Master(cfg) as master:
        request = pb.DrainNodeRequest(node_id=args.node, force=args.force, cancel=args.cancel)
        reply: pb.DrainNodeResponse = master.admin("DrainNode", request)
        poll = pb.DrainNodeRequest(node_id=args.node, status_only=True)
        while reply.state == "running" and not args.no_wait and not args.cancel:
            if tty:
                print("\r" + _bar(reply), end="", flush=True)
            time.sleep(POLL_S)
            reply = master.admin("DrainNode", poll)
    if args.json:
        print_json(proto_to_dict(reply))
    else:
        if tty:
            print("\r" + _bar(reply))
        print(f"drain of {args.node}: {reply.state}" + (f" ({reply.message})" if reply.message else ""))
        if reply.pages_unplaced:
            print(f"{reply.pages_unplaced} pages found no room on any other node")
    return 0 if reply.state in ("done", "running", "cancelled") else 1


def add_commands(command: object) -> None:
    """Register pin / unpin / drain with ``kvstore.cli.main``'s ``command`` helper."""
    from collections.abc import Callable
    from typing import cast

    make = cast(Callable[..., argparse.ArgumentParser], command)
    pin = make("pin", cmd_pin, "keep a prefix out of eviction and demotion for a bounded time")
    pin.add_argument("--namespace", required=True)
    add_prefix_arguments(pin, required=True)
    pin.add_argument("--ttl-s", type=float, required=True, help="seconds (capped by the master's max_pin_ms)")
    unpin = make("unpin", cmd_unpin, "end a pin now")
    unpin.add_argument("--namespace", required=True)
    add_prefix_arguments(unpin, required=True)
    drain = make("drain", cmd_drain, "move every page off a node to the others, then unregister it")
    drain.add_argument("node", help="node id (kvstore nodes)")
    drain.add_argument("--force", action="store_true", help="unregister even if some pages fit nowhere")
    drain.add_argument("--cancel", action="store_true", help="stop a drain in progress")
    drain.add_argument(
        "--no-wait", action="store_true", help="start it and return (poll with kvstore drain NODE)"
    )
