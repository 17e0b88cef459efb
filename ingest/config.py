"""Ingest settings and tenants, read from a TOML file (and the environment for Kafka); the
edge reads the tenants again on SIGHUP."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_KEYS = 4
"""Secrets a tenant's ``token_sha256`` may list at once (a rotation under way)."""


class ConfigError(ValueError):
    """The configuration file is invalid; the message says where."""


@dataclass(frozen=True)
class Tenant:
    """One Keyyo customer allowed to send notifications."""

    id: str
    """Path segment in ``/v1/keyyo/{tenant}/notifications``."""
    tokens_sha256: tuple[bytes, ...]
    """SHA-256 digests of the secrets accepted as ``key=``: the current one first, then those
    still accepted while a rotation is under way (see :data:`MAX_KEYS`)."""
    allow_from: tuple[IPNetwork, ...] = ()
    """Source networks allowed to notify; empty means any (the actions API is not restricted)."""
    api_token_sha256: bytes | None = None
    """SHA-256 digest of the actions API's bearer token (separate from the notification secret);
    None: the tenant has no actions API."""
    max_per_second: float | None = None
    """Requests per second (notifications and actions API together) this tenant may send to one
    edge process; more get 429. None: ``[ingest] tenant_max_per_second``; 0: no limit."""

    def __post_init__(self) -> None:
        tokens = self.tokens_sha256
        if not tokens or not all(isinstance(t, bytes) and len(t) == 32 for t in tokens):
            raise ValueError("tokens_sha256: a tuple of SHA-256 digests (32 bytes each)")

    def key_index(self, secret: str) -> int | None:
        """Which accepted secret ``secret`` is (0: the current one, 1 or more: one still accepted
        during a rotation), None if none; every digest is compared, in constant time each."""
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        found = None
        for index, token in enumerate(self.tokens_sha256):
            if hmac.compare_digest(digest, token) and found is None:
                found = index
        return found

    def key_matches(self, secret: str) -> bool:
        """True when ``secret`` is one of the tenant's accepted secrets."""
        return self.key_index(secret) is not None

    def api_token_matches(self, token: str) -> bool:
        """Constant-time check of an actions API token (always False without one configured)."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        expected = self.api_token_sha256 or bytes(32)
        return hmac.compare_digest(digest, expected) and self.api_token_sha256 is not None

    def source_allowed(self, ip: str) -> bool:
        """True when ``ip`` is in ``allow_from`` (or no list is set)."""
        if not self.allow_from:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow_from)


@dataclass(frozen=True)
class IngestSettings:
    """Everything the ingest edge reads from its config file and environment."""

    tenants: dict[str, Tenant]
    """Tenants by id."""
    bootstrap_servers: str = "127.0.0.1:9092"
    """Kafka bootstrap servers; ``KAFKA_BOOTSTRAP_SERVERS`` overrides the file."""
    topic_prefix: str = ""
    """Prefix of every topic name; ``KEYYO_TOPIC_PREFIX`` overrides the file."""
    produce_budget_seconds: float = 2.0
    """How long a request waits for Kafka's ack before answering 503 (or spooling)."""
    linger_ms: int = 0
    """Producer linger: 0 lets in-flight batching do the work."""
    spool_dir: Path | None = None
    """When set, events Kafka cannot take in time are fsync'd here and replayed in order."""
    spool_max_bytes: int = 256 * 1024 * 1024
    """Spool size at which requests are refused with 503."""
    spool_ready_fraction: float = 0.8
    """``/readyz`` turns not-ready once the spool holds this fraction of its limit."""
    max_event_ahead_seconds: float = 300.0
    """A ``tsms`` more than this ahead of the receive time is refused (400)."""
    max_event_behind_seconds: float = 86_400.0
    """A ``tsms`` more than this behind the receive time is refused (400)."""
    body_timeout_seconds: float = 10.0
    """A POST body not complete within this is refused (408)."""
    action_results_kept: int = 50_000
    """Latest action results the edge keeps in memory for ``GET .../actions/{id}`` (oldest first out)."""
    tenant_max_per_second: float = 0.0
    """Each tenant's request budget per edge process unless its own ``max_per_second`` says
    otherwise; 0: no limit."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unused sections, kept for other deployables sharing the file."""


def _non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (0: no limit)")
    return float(value)


def hash_secret(secret: str) -> str:
    """The ``token_sha256`` value to store for a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _tenant(tenant_id: str, raw: Any) -> Tenant:
    where = f"[tenants.{tenant_id}]"
    if not _TENANT_ID.fullmatch(tenant_id):
        raise ConfigError(f"{where}: tenant id must match {_TENANT_ID.pattern}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    given = raw.get("token_sha256")
    tokens = [given] if isinstance(given, str) else given
    if (not isinstance(tokens, list) or not 1 <= len(tokens) <= MAX_KEYS
            or not all(isinstance(t, str) and _SHA256_HEX.fullmatch(t.lower()) for t in tokens)):
        raise ConfigError(f"{where}: token_sha256 must be 64 hex digits (keyyo-stream secret), or a "
                          f"list of 1 to {MAX_KEYS} of them during a key rotation, the current one first")
    tokens = [t.lower() for t in tokens]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"{where}: token_sha256 lists the same secret twice")
    nets: list[IPNetwork] = []
    for cidr in raw.get("allow_from", []):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: allow_from entry {cidr!r}: {exc}") from exc
    api = raw.get("api_token_sha256")
    if api is not None and (not isinstance(api, str) or not _SHA256_HEX.fullmatch(api.lower())):
        raise ConfigError(f"{where}: api_token_sha256 must be 64 hex digits (keyyo-stream secret --api)")
    if api is not None and api.lower() in tokens:
        raise ConfigError(f"{where}: api_token_sha256 must differ from token_sha256 (separate secrets)")
    limit = raw.get("max_per_second")
    try:
        budget = None if limit is None else _non_negative(limit, "max_per_second")
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Tenant(tenant_id, tuple(bytes.fromhex(t) for t in tokens), tuple(nets),
                  bytes.fromhex(api) if api else None, budget)


def load_settings(path: Path, env: dict[str, str] | None = None) -> IngestSettings:
    """Read the TOML config; environment variables override the Kafka settings."""
    env = dict(os.environ) if env is None else env
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    tenants_raw = data.get("tenants", {})
    if not isinstance(tenants_raw, dict):
        raise ConfigError(f"{path}: [tenants] must be a table of tables")
    tenants = {tid: _tenant(tid, raw) for tid, raw in tenants_raw.items()}
    kafka = data.get("kafka", {})
    ingest = data.get("ingest", {})
    spool = ingest.get("spool_dir")
    try:
        return IngestSettings(
            tenants=tenants,
            bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS")
            or kafka.get("bootstrap_servers", "127.0.0.1:9092"),
            topic_prefix=env.get("KEYYO_TOPIC_PREFIX", kafka.get("topic_prefix", "")),
            produce_budget_seconds=float(ingest.get("produce_budget_seconds", 2.0)),
            linger_ms=int(ingest.get("linger_ms", 0)),
            spool_dir=(path.parent / spool) if spool else None,
            spool_max_bytes=int(ingest.get("spool_max_bytes", 256 * 1024 * 1024)),
            spool_ready_fraction=float(ingest.get("spool_ready_fraction", 0.8)),
            max_event_ahead_seconds=float(ingest.get("max_event_ahead_seconds", 300.0)),
            max_event_behind_seconds=float(ingest.get("max_event_behind_seconds", 86_400.0)),
            body_timeout_seconds=float(ingest.get("body_timeout_seconds", 10.0)),
            action_results_kept=int(ingest.get("action_results_kept", 50_000)),
            tenant_max_per_second=_non_negative(ingest.get("tenant_max_per_second", 0.0),
                                                "tenant_max_per_second"),
            extra={k: v for k, v in data.items() if k not in ("tenants", "kafka", "ingest")},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: [ingest]: {exc}") from exc
