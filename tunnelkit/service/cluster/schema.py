"""
The cluster's tables in the PostgreSQL store (a schema migration of their own, after the store's):
nodes and their heartbeats, where each tunnel is placed, which node holds each side's peer, and leases.
Times are the database's (C{clock_timestamp()}): the nodes' clocks need not agree.
"""

DESCRIPTION = "the cluster's tables: cluster_nodes, cluster_placements, cluster_peers, cluster_leases"

SQL = """
CREATE TABLE cluster_nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE cluster_placements (
    routing_key TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    placed_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX cluster_placements_by_node ON cluster_placements (node_id);
CREATE TABLE cluster_peers (
    routing_key TEXT NOT NULL,
    side TEXT NOT NULL,
    tunnel_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    channel_id TEXT NOT NULL,
    since TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (routing_key, side)
);
CREATE INDEX cluster_peers_by_node ON cluster_peers (node_id);
CREATE TABLE cluster_leases (
    name TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"""

NOTIFICATIONS_DESCRIPTION = "the cluster's shared MQTT notification queue: cluster_notifications"

NOTIFICATIONS_SQL = """
CREATE SEQUENCE cluster_notifications_seq;
CREATE TABLE cluster_notifications (
    tunnel_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    thing_name TEXT NOT NULL,
    payload BYTEA NOT NULL,
    queued_at DOUBLE PRECISION NOT NULL,
    claimed_by TEXT NOT NULL,
    claimed_until TIMESTAMPTZ NOT NULL
);
CREATE INDEX cluster_notifications_by_claim ON cluster_notifications (claimed_until);
"""
