"""Admin subcommands: nodes, stats, namespaces, evict, config (each one or two unary RPCs to the master)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def _etcd_view(cfg: kvconfig.Config) -> tuple[str | None, list[str], dict[str, bytes]]:
    """(leader, masters, node registrations) as etcd records them."""
    from kvstore.metadata import create_backend

    async def read() -> tuple[str | None, list[str], dict[str, bytes]]:
        metadata = create_backend(cfg.etcd, cluster=cfg.cluster, timeout_s=cfg.rpc_timeout_ms / 1000.0)
        try:
            return await metadata.leader(), await metadata.list_masters(), await metadata.list_nodes()
        finally:
            await metadata.close()

    return asyncio.run(read())


class Master:
    """The masters named by ``--master`` (or found in ``--etcd``); calls go to the one that answers as leader."""

    def __init__(self, cfg: kvconfig.Config) -> None:
        self.addresses = [a.strip() for a in str(cfg.master).split(",") if a.strip()]
        self.etcd_leader: str | None = None
        self.etcd_masters: list[str] = []
        self.etcd_nodes: dict[str, bytes] | None = None
        if str(cfg.etcd).strip():
            self.etcd_leader, self.etcd_masters, self.etcd_nodes = _etcd_view(cfg)
            # the leader etcd names first, then every other master it lists
            found = ([self.etcd_leader] if self.etcd_leader else []) + self.etcd_masters
            self.addresses = list(dict.fromkeys(found)) or self.addresses
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
        queue = list(self.addresses)
        tried: set[str] = set()
        while queue:
            address = queue.pop(0)
            if address in tried:
                continue
            tried.add(address)
            rpc = getattr(stub_class(self._channel(address)), method)
            try:
                return rpc(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                last = from_rpc_error(exc)
                if last.code not in _TRY_NEXT:
                    raise last from None
                if last.leader:
                    queue.insert(0, last.leader)  # a standby named the leader: ask it next
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

    def roles(self) -> list[tuple[str, str, int]]:
        """(address, "leader" | "standby" | "unreachable", term) of every known master, leader first.

        Each master is asked itself (Admin ListNodes works on standbys); etcd's list of
        campaigning masters adds those not named by --master.
        """
        found: list[tuple[str, str, int]] = []
        for address in dict.fromkeys(self.addresses + self.etcd_masters):
            try:
                reply = pb_grpc.AdminStub(self._channel(address)).ListNodes(
                    pb.ListNodesRequest(), timeout=self.timeout
                )
            except grpc.RpcError:
                found.append((address, "unreachable", 0))
                continue
            role = "leader" if reply.leader_address == address else "standby"
            found.append((address, role, int(reply.term)))
        return sorted(found, key=lambda item: (item[1] != "leader", item[0]))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------- nodes


def cmd_nodes(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    with Master(cfg) as master:
        reply: pb.ListNodesResponse = master.admin("ListNodes", pb.ListNodesRequest())
        if reply.leader_address and reply.leader_address not in master.addresses:
            master.addresses.append(reply.leader_address)
        if reply.leader_address:
            # Any master answers ListNodes; only the leader knows heartbeat ages and usage: ask it.
            with contextlib.suppress(grpc.RpcError):
                reply = pb_grpc.AdminStub(master._channel(reply.leader_address)).ListNodes(
                    pb.ListNodesRequest(), timeout=master.timeout
                )
        masters = master.roles()
        registered = master.etcd_nodes
    if args.json:
        data = proto_to_dict(reply)
        data["masters"] = [{"address": a, "role": r, "term": t} for a, r, t in masters]
        if registered is not None:
            for node in data["nodes"]:
                node["registered"] = node["node_id"] in registered
        print_json(data)
        return 0
    rows = []
    for node in reply.nodes:
        capacity = sum(t.capacity_bytes for t in node.tiers)
        allocated = sum(t.allocated_bytes for t in node.tiers)
        state = "alive" if node.alive else "DEAD"
        if registered is not None:
            state += ", registered" if node.node_id in registered else ", unregistered"
        rows.append(
            [
                node.node_id,
                state,
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
    if masters:
        print(render_table(["master", "role", "term"], [[a, r, t or "-"] for a, r, t in masters], right=(2,)))
        print()
    if rows:
        print(
            render_table(
                ["node", "state", "lease age", "data", "control", "tiers", "capacity", "used", "host"],
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
    with Master(cfg) as master:
        reply: pb.ClusterStatsResponse = master.admin("ClusterStats", pb.ClusterStatsRequest())
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
                    tier.segments,
                    percent(tier.hits, tier.lookups),
                    tier.demotions,
                    tier.promotions,
                    tier.evictions,
                ]
            )
    print(
        render_table(
            [
                "node",
                "tier",
                "capacity",
                "used",
                "used%",
                "quarantined",
                "pages",
                "segments",
                "hit rate",
                "demoted",
                "promoted",
                "evictions",
            ],
            rows,
            right=(2, 3, 4, 5, 6, 7, 8, 9, 10, 11),
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
    with Master(cfg) as master:
        reply: pb.ListNamespacesResponse = master.kvstore("ListNamespaces", pb.ListNamespacesRequest())
        usage = {ns.name: ns for ns in master.admin("ClusterStats", pb.ClusterStatsRequest()).namespaces}
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
    from kvstore.cli.tiers import prefix_keys

    tokens, key = getattr(args, "tokens", None), getattr(args, "key", None)
    node, tier = getattr(args, "node", None) or "", getattr(args, "tier", None) or ""
    if not (args.namespace or args.all or node or tier):
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "name --namespace, --node or --tier, or pass --all")
    with Master(cfg) as master:
        packed = prefix_keys(master, args.namespace, tokens, key) if tokens or key else b""
        request = pb.EvictRequest(
            namespace=args.namespace or "", all=bool(args.all), keys=packed, node_id=node, tier=tier
        )
        reply: pb.EvictResponse = master.admin("Evict", request)
    if args.json:
        print_json(proto_to_dict(reply))
        return 0
    scopes = [f"namespace {args.namespace}" if args.namespace else "every namespace"]
    if packed:
        scopes.append("that prefix (and what extends it)")
    if node:
        scopes.append(f"node {node}")
    if tier:
        scopes.append(f"tier {tier}")
    target = ", ".join(scopes)
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
    with Master(cfg) as master:
        reply: pb.GetConfigResponse = master.admin("GetConfig", pb.GetConfigRequest())
    if args.json:
        print_json({"source": "master", "toml": reply.toml})
    else:
        print(f"# the master's effective settings ({','.join(master.addresses)})")
        print(reply.toml, end="" if reply.toml.endswith("\n") else "\n")
    return 0
