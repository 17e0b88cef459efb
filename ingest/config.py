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
    api_tokens_sha256: tuple[bytes, ...] = ()
    """SHA-256 digests of the actions API's bearer tokens (separate from the notification
    secrets), the current one first, as for the key; empty: the tenant has no actions API."""
    max_per_second: float | None = None
    """Requests per second (notifications and actions API together) this tenant may send to one
    edge process; more get 429. None: ``[ingest] tenant_max_per_second``; 0: no limit."""

    def __post_init__(self) -> None:
        for name, digests, least in (("tokens_sha256", self.tokens_sha256, 1),
                                     ("api_tokens_sha256", self.api_tokens_sha256, 0)):
            if len(digests) < least or not all(isinstance(d, bytes) and len(d) == 32 for d in digests):
                raise ValueError(f"{name}: a tuple of SHA-256 digests (32 bytes each)")

    def key_index(self, secret: str) -> int | None:
        """Which accepted secret ``secret`` is (0: the current one, 1 or more: one still accepted
        during a rotation), None if none."""
        return _index_of(secret, self.tokens_sha256)

    def key_matches(self, secret: str) -> bool:
        """True when ``secret`` is one of the tenant's accepted secrets."""
        return self.key_index(secret) is not None

    def api_token_index(self, token: str) -> int | None:
        """Which accepted actions API token ``token`` is (as :meth:`key_index`); None if none, and
        always without an API token configured."""
        found = _index_of(token, self.api_tokens_sha256 or (bytes(32),))  # the same work without one
        return found if self.api_tokens_sha256 else None

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


def _index_of(secret: str, digests: tuple[bytes, ...]) -> int | None:
    """The position of ``secret``'s SHA-256 among ``digests``; every one is compared, each in
    constant time, so the answer's timing says nothing of which matched or how closely."""
    digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
    found = None
    for index, expected in enumerate(digests):
        if hmac.compare_digest(digest, expected) and found is None:
            found = index
    return found


def _digests(raw: dict[str, Any], name: str, where: str, hint: str) -> list[str]:
    """A tenant's ``name``: one hex SHA-256 digest, or a list of 1 to :data:`MAX_KEYS` of them
    during a rotation (the current one first); [] when absent."""
    given = raw.get(name)
    if given is None:
        return []
    digests = [given] if isinstance(given, str) else given
    if (not isinstance(digests, list) or not 1 <= len(digests) <= MAX_KEYS
            or not all(isinstance(d, str) and _SHA256_HEX.fullmatch(d.lower()) for d in digests)):
        raise ConfigError(f"{where}: {name} must be 64 hex digits ({hint}), or a list of 1 to "
                          f"{MAX_KEYS} of them during a rotation, the current one first")
    digests = [d.lower() for d in digests]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{where}: {name} lists the same secret twice")
    return digests


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
    tokens = _digests(raw, "token_sha256", where, "keyyo-stream secret")
    if not tokens:
        raise ConfigError(f"{where}: token_sha256 must be 64 hex digits (keyyo-stream secret)")
    nets: list[IPNetwork] = []
    for cidr in raw.get("allow_from", []):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: allow_from entry {cidr!r}: {exc}") from exc
    api = _digests(raw, "api_token_sha256", where, "keyyo-stream secret --api")
    if set(api) & set(tokens):
        raise ConfigError(f"{where}: api_token_sha256 must differ from token_sha256 (separate secrets)")
    limit = raw.get("max_per_second")
    try:
        budget = None if limit is None else _non_negative(limit, "max_per_second")
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Tenant(tenant_id, tuple(bytes.fromhex(t) for t in tokens), tuple(nets),
                  tuple(bytes.fromhex(t) for t in api), budget)


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
