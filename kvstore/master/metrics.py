"""A minimal Prometheus text endpoint for the master (``--metrics-port``; 0: off).

Plain asyncio, no extra dependency: ``GET /metrics`` answers the current
gauges and counters; anything else gets 404.  Values are read from the
master's in-memory state at request time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from kvstore.master.core import Master

if TYPE_CHECKING:
    from kvstore.master.role import MasterRole

log = logging.getLogger("kvstore.master.metrics")

READ_TIMEOUT_S = 5.0


def render_role(role: MasterRole) -> str:
    """The leader's metrics; a standby reports only that it does not lead."""
    master = role.current
    if master is None:
        return "# TYPE kvstore_master_leader gauge\nkvstore_master_leader 0\n"
    return "# TYPE kvstore_master_leader gauge\nkvstore_master_leader 1\n" + render(master)


def render(master: Master) -> str:
    stats = master.cluster_stats()
    lines = [
        "# TYPE kvstore_master_term gauge",
        f"kvstore_master_term {master.term}",
        "# TYPE kvstore_pages gauge",
        f"kvstore_pages {stats.pages}",
        "# TYPE kvstore_read_leases gauge",
        f"kvstore_read_leases {stats.active_read_leases}",
        "# TYPE kvstore_put_sessions gauge",
        f"kvstore_put_sessions {stats.open_put_sessions}",
        "# TYPE kvstore_prefix_hits_total counter",
        f"kvstore_prefix_hits_total {stats.hits}",
        "# TYPE kvstore_prefix_lookups_total counter",
        f"kvstore_prefix_lookups_total {stats.lookups}",
    ]
    per_node = (
        ("kvstore_node_alive", "gauge", lambda n, t: int(n.alive)),
        ("kvstore_node_capacity_bytes", "gauge", lambda n, t: t.capacity_bytes),
        ("kvstore_node_allocated_bytes", "gauge", lambda n, t: t.allocated_bytes),
        ("kvstore_node_quarantined_bytes", "gauge", lambda n, t: t.quarantined_bytes),
        ("kvstore_node_pages", "gauge", lambda n, t: t.pages),
        ("kvstore_node_hits_total", "counter", lambda n, t: t.hits),
        ("kvstore_node_lookups_total", "counter", lambda n, t: t.lookups),
        ("kvstore_node_evictions_total", "counter", lambda n, t: t.evictions),
        # tiers
        ("kvstore_node_segments", "gauge", lambda n, t: t.segments),
        ("kvstore_node_demotions_total", "counter", lambda n, t: t.demotions),
        ("kvstore_node_promotions_total", "counter", lambda n, t: t.promotions),
        ("kvstore_node_draining", "gauge", lambda n, t: int(t.draining)),
    )
    for name, kind, value in per_node:
        lines.append(f"# TYPE {name} {kind}")
        for node in stats.nodes:
            for tier in node.tiers:
                labels = f'node="{_escape(node.node_id)}",tier="{_escape(tier.tier)}"'
                lines.append(f"{name}{{{labels}}} {value(node, tier)}")
    tiering = master.tiering
    lines += [
        "# TYPE kvstore_tier_pages_demoted_total counter",
        f"kvstore_tier_pages_demoted_total {tiering.pages_demoted}",
        "# TYPE kvstore_tier_bytes_demoted_total counter",
        f"kvstore_tier_bytes_demoted_total {tiering.bytes_demoted}",
        "# TYPE kvstore_tier_pages_promoted_total counter",
        f"kvstore_tier_pages_promoted_total {tiering.pages_promoted}",
        "# TYPE kvstore_tier_move_seconds_total counter",
        f"kvstore_tier_move_seconds_total {tiering.move_seconds:.6f}",
    ]
    lines.append("# TYPE kvstore_namespace_pages gauge")
    for ns in stats.namespaces:
        lines.append(f'kvstore_namespace_pages{{namespace="{_escape(ns.name)}"}} {ns.pages}')
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve_metrics(role: MasterRole, host: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            while (await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)).strip():
                pass  # headers
            parts = request_line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = render_role(role).encode(), "200 OK"
            else:
                body, status = b"not found\n", "404 Not Found"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics on %s:%d", host, port)
    return server
