"""Start-up guards of the exactly-once store: what makes forgetting unsafe. Pure decisions.

The store remembers each command for `IDEMPOTENCY_RETENTION_S`; a command older than that is
refused by age (`command_expired`, see `once.ExactlyOnce`), never sent. Two more ways to
forget are caught at start:
- command topics that keep records longer than the store keeps commands: a new consumer group
  or an offset reset replays them (they would be refused by age, but someone should know);
- an instance in the same consumer group with a store of its own (the default SQLite file on
  another host): after a rebalance, a command one of them sent would be sent again by the
  other. Every instance heartbeats in its store, and its Kafka client id names it
  (`client_id_of`), so a member of the group that this store never heard of has another store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CLIENT_ID_PREFIX = "voucher-bridge-"


def client_id_of(instance: str) -> str:
    """The Kafka client id of an instance: how the group's members are told apart."""
    return CLIENT_ID_PREFIX + instance


def instance_of(client_id: str) -> str | None:
    """The instance a member's client id names; None for a client that is not voucher-bridge."""
    if not client_id.startswith(CLIENT_ID_PREFIX):
        return None
    return client_id.removeprefix(CLIENT_ID_PREFIX) or None


def topics_kept_longer(retention_ms: Mapping[str, int], store_retention_s: float) -> list[str]:
    """The topics whose records outlive the store's memory of them (-1: kept for ever)."""
    limit_ms = store_retention_s * 1000
    return sorted(t for t, ms in retention_ms.items() if ms < 0 or ms > limit_ms)


def members_of_other_stores(client_ids: Iterable[str], known: set[str]) -> list[str]:
    """The group's voucher-bridge members that this store never heard of."""
    return sorted(c for c in client_ids if (i := instance_of(c)) is not None and i not in known)


def unnamed_members(client_ids: Iterable[str]) -> list[str]:
    """Members whose client id names no instance (a release before instances were named, or
    another client in the group): nothing tells whether they share the store."""
    return sorted(c for c in client_ids if instance_of(c) is None)
