"""Running the ingest edge in the test process, against a real broker."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from deploy.topics import create_topics
from ingest.app import PUBLISHER, EdgeRunner, build_app
from ingest.config import IngestSettings, Tenant, hash_secret
from ingest.publisher import Publisher
from schemas.topics import NOTIFICATIONS, NOTIFICATIONS_REJECTED

SECRET = "s3cret-acme"
API_TOKEN = "api-token-of-the-tests"
TENANT = "acme"


class Edge:
    """A running edge and a client to it."""

    def __init__(self, client: TestClient, settings: IngestSettings) -> None:
        self.client = client
        self.settings = settings

    @property
    def publisher(self) -> Publisher:
        return self.client.app[PUBLISHER]  # type: ignore[index]

    @property
    def topic(self) -> str:
        return self.settings.topic_prefix + NOTIFICATIONS.name

    @property
    def rejected_topic(self) -> str:
        return self.settings.topic_prefix + NOTIFICATIONS_REJECTED.name

    async def notify(self, params: dict[str, str], tenant: str = TENANT,
                     key: str | None = SECRET) -> ClientResponse:
        query = {**({"key": key} if key is not None else {}), **params}
        async with self.client.get(f"/v1/keyyo/{tenant}/notifications", params=query) as resp:
            await resp.read()
            return resp

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.client.get(path) as resp:
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, body.decode()


TENANTS = ("acme", "globex", "initech", "umbrella")


class EdgeTestServer(TestServer):
    """The test server, with the edge's own runner (its JSON answers to unreadable requests)."""

    async def _make_runner(self, **kwargs: Any) -> EdgeRunner:
        return EdgeRunner(self.app, **kwargs)


def tenants() -> dict[str, Tenant]:
    """Test tenants, all with secret SECRET: TENANTS, and ``locked`` (only from 10.0.0.0/8)."""
    digest = (bytes.fromhex(hash_secret(SECRET)),)
    return {
        **{name: Tenant(name, digest, (), (bytes.fromhex(hash_secret(API_TOKEN)),)) for name in TENANTS},
        "locked": Tenant("locked", digest, (ipaddress.ip_network("10.0.0.0/8"),)),
    }


@asynccontextmanager
async def running_edge(
    bootstrap: str, prefix: str, *, budget_s: float = 2.0, spool_dir: Path | None = None,
    spool_max_bytes: int = 256 * 1024 * 1024, create: bool = True, **overrides: Any,
) -> AsyncIterator[Edge]:
    """Create the prefix's topics, start the edge, yield it, then shut it down gracefully."""
    if create:
        await create_topics(bootstrap, prefix, partitions=3)
    settings = IngestSettings(**{
        "tenants": tenants(), "bootstrap_servers": bootstrap, "topic_prefix": prefix,
        "produce_budget_seconds": budget_s, "spool_dir": spool_dir, "spool_max_bytes": spool_max_bytes,
        **overrides,
    })
    client = TestClient(EdgeTestServer(build_app(settings)))
    await client.start_server()
    try:
        yield Edge(client, settings)
    finally:
        await client.close()
