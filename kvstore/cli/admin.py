"""Admin subcommands: nodes, stats, namespaces, evict, config (each one or two unary RPCs to the master)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from kvstore import config as kvconfig
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.cli.output import percent, print_json, proto_to_dict, render_table
from kvstore.config import format_size
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error

_Response = TypeVar("_Response")

# Answers after which the next listed master may do better (a standby, or one that is down).
_TRY_NEXT = {ErrorCode.UNAVAILABLE, ErrorCode.NOT_LEADER, ErrorCode.DEADLINE}


class Master:
    """The master(s) named by ``--master`` / KVSTORE_MASTER; calls go to the first that answers as leader."""

    def __init__(self, cfg: kvconfig.Config) -> None:
        self.addresses = [a.strip() for a in str(cfg.master).split(",") if a.strip()]
        if not self.addresses:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "no master address (use --master or KVSTORE_MASTER)"
            )
        self.timeout = cfg.rpc_timeout_ms / 1000.0
        self.max_message = int(cfg.max_message_bytes)
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            options = [("grpc.max_receive_message_length", self.max_message)]
            self._channels[address] = grpc.insecure_channel(address, options=options)
        return self._channels[address]

    def call(self, stub_class: Callable[[grpc.Channel], Any], method: str, request: Any) -> Any:
        last: KVStoreError | None = None
        for address in self.addresses:
            rpc = getattr(stub_class(self._channel(address)), method)
            try:
                return rpc(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                last = from_rpc_error(exc)
                if last.code not in _TRY_NEXT:
                    raise last from None
        assert last is not None
        if last.code == ErrorCode.UNAVAILABLE:
            raise KVStoreError(
                ErrorCode.UNAVAILABLE,
                f"no master answers at {','.join(self.addresses)} ({last.message}); start one with `kvstore up`",
            )
        raise last

    def admin(self, method: str, request: Any) -> Any:
        return self.call(pb_grpc.AdminStub, method, request)

    def kvstore(self, method: str, request: Any) -> Any:
        return self.call(pb_grpc.KVStoreStub, method, request)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


# ---------------------------------------------------------------- nodes


def cmd_nodes(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    master = Master(cfg)
    try:
        reply: pb.ListNodesResponse = master.admin("ListNodes", pb.ListNodesRequest())
    finally:
        master.close()
    if args.json:
        print_json(proto_to_dict(reply))
        return 0
    rows = []
    for node in reply.nodes:
        capacity = sum(t.capacity_bytes for t in node.tiers)
        allocated = sum(t.allocated_bytes for t in node.tiers)
        rows.append(
            [
                node.node_id,
                "alive" if node.alive else "DEAD",
                f"{node.last_heartbeat_age_s:.1f}s",
                node.data_address,
                node.control_address,
                ",".join(t.tier for t in node.tiers) or "-",
                format_size(capacity),
                percent(allocated, capacity),
                node.host_id,
            ]
        )
    print(f"leader {reply.leader_address or '?'}  term {reply.term}  nodes {len(reply.nodes)}")
    if rows:
        print(
            render_table(
                ["node", "state", "heartbeat", "data", "control", "tiers", "capacity", "used", "host"],
                rows,
                right=(2, 6, 7),
            )
        )
    return 0


# ---------------------------------------------------------------- stats


def stats_dict(reply: pb.ClusterStatsResponse) -> dict[str, Any]:
    """ClusterStats as JSON, with each tier's hit rate added."""
    data = proto_to_dict(reply)
    for node in data["nodes"]:
        for tier in node["tiers"]:
            tier["hit_rate"] = tier["hits"] / tier["lookups"] if tier["lookups"] else None
    data["hit_rate"] = reply.hits / reply.lookups if reply.lookups else None
    return data


def cmd_stats(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    master = Master(cfg)
    try:
        reply: pb.ClusterStatsResponse = master.admin("ClusterStats", pb.ClusterStatsRequest())
    finally:
        master.close()
    if args.json:
        print_json(stats_dict(reply))
        return 0
    rows = []
    for node in reply.nodes:
        for tier in node.tiers:
            rows.append(
                [
                    node.node_id + ("" if node.alive else " (dead)"),
                    tier.tier,
                    format_size(tier.capacity_bytes),
                    format_size(tier.allocated_bytes),
                    percent(tier.allocated_bytes, tier.capacity_bytes),
                    format_size(tier.quarantined_bytes),
                    tier.pages,
                    percent(tier.hits, tier.lookups),
                    tier.evictions,
                ]
            )
    print(
        render_table(
            ["node", "tier", "capacity", "used", "used%", "quarantined", "pages", "hit rate", "evictions"],
            rows,
            right=(2, 3, 4, 5, 6, 7, 8),
        )
    )
    print()
    print(
        f"pages {reply.pages}  hit rate {percent(reply.hits, reply.lookups)} ({reply.hits}/{reply.lookups} pages)  "
        f"read leases {reply.active_read_leases}  open puts {reply.open_put_sessions}"
    )
    if reply.namespaces:
        print()
        ns_rows = [[ns.name, ns.pages, format_size(ns.bytes)] for ns in reply.namespaces]
        print(render_table(["namespace", "pages", "bytes"], ns_rows, right=(1, 2)))
    return 0


# ---------------------------------------------------------------- namespaces


def _geometry_text(spec: pb.NamespaceSpec) -> str:
    if not spec.HasField("geometry") or not spec.geometry.kind:
        return "opaque"
    g = spec.geometry
    return f"{g.kind} {g.kv_heads}x{g.head_dim} {g.dtype}"


def cmd_namespaces(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    master = Master(cfg)
    try:
        reply: pb.ListNamespacesResponse = master.kvstore("ListNamespaces", pb.ListNamespacesRequest())
        usage = {ns.name: ns for ns in master.admin("ClusterStats", pb.ClusterStatsRequest()).namespaces}
    finally:
        master.close()
    specs = sorted(reply.specs, key=lambda s: s.name)
    if args.json:
        items = []
        for spec in specs:
            item = proto_to_dict(spec)
            used = usage.get(spec.name)
            item["pages"] = used.pages if used else 0
            item["bytes"] = used.bytes if used else 0
            items.append(item)
        print_json({"namespaces": items})
        return 0
    rows = []
    for spec in specs:
        used = usage.get(spec.name)
        rows.append(
            [
                spec.name,
                spec.page_size,
                spec.num_layers,
                format_size(spec.segment_bytes),
                _geometry_text(spec),
                format_size(spec.quota_bytes) if spec.quota_bytes else "-",
                used.pages if used else 0,
                format_size(used.bytes if used else 0),
            ]
        )
    if not rows:
        print("no namespaces")
        return 0
    print(
        render_table(
            ["namespace", "page", "layers", "segment", "geometry", "quota", "pages", "bytes"],
            rows,
            right=(1, 2, 3, 5, 6, 7),
        )
    )
    return 0


# ---------------------------------------------------------------- evict


def cmd_evict(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    master = Master(cfg)
    try:
        request = pb.EvictRequest(namespace=args.namespace or "", all=bool(args.all))
        reply: pb.EvictResponse = master.admin("Evict", request)
    finally:
        master.close()
    if args.json:
        print_json(proto_to_dict(reply))
        return 0
    target = f"namespace {args.namespace}" if args.namespace else "every namespace"
    print(
        f"evicted {reply.pages_evicted} pages from {target}; "
        f"{reply.pages_skipped_leased} skipped (under a read lease)"
    )
    return 0


# ---------------------------------------------------------------- config


def cmd_config(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    if not args.remote:
        text = cfg.to_toml()
        if args.json:
            values = cfg.as_dict()
            if values.get("grant_secret"):
                values["grant_secret"] = "<set>"
            print_json({"source": "local", "settings": values})
        else:
            print("# effective settings (defaults < config file < KVSTORE_* environment < flags)")
            print(text, end="")
        return 0
    master = Master(cfg)
    try:
        reply: pb.GetConfigResponse = master.admin("GetConfig", pb.GetConfigRequest())
    finally:
        master.close()
    if args.json:
        print_json({"source": "master", "toml": reply.toml})
    else:
        print(f"# the master's effective settings ({','.join(master.addresses)})")
        print(reply.toml, end="" if reply.toml.endswith("\n") else "\n")
    return 0
