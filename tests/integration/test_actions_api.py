"""The edge's actions API on a real broker: auth, validation, idempotency, results, tenant isolation;
an API action goes through the executor to the Keyyo sandbox once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.topics import create_topics
from devtools.sandbox import Sandbox, running
from schemas.topics import ACTION_RESULTS, ACTIONS
from tests.integration.edge import API_TOKEN, SECRET, Edge, running_edge
from tests.integration.test_executor import PASSWORDS, executor
from tests.kafka import Broker, read_values, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")
LINE = next(iter(PASSWORDS))
SMS = {"kind": "sms", "account": LINE, "callee": "33612345678", "message": "Votre rendez-vous est confirmé."}


async def post(edge: Edge, body: Any, tenant: str = "acme", token: str | None = API_TOKEN,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = {**({"Authorization": f"Bearer {token}"} if token is not None else {}), **(headers or {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with edge.client.post(f"/v1/keyyo/{tenant}/actions", data=data, headers={
            "Content-Type": "application/json", **h}) as resp:
        return resp.status, await resp.json()


async def get(edge: Edge, aid: str, tenant: str = "acme", token: str = API_TOKEN) -> tuple[int, Any]:
    async with edge.client.get(f"/v1/keyyo/{tenant}/actions/{aid}",
                               headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


async def test_actions_api(broker: Broker, prefix: str) -> None:
    await create_topics(broker.bootstrap, prefix, partitions=3)
    sb = Sandbox(passwords=PASSWORDS)
    async with running(sb) as url, running_edge(broker.bootstrap, prefix, create=False) as edge:
        # who may ask
        assert (await post(edge, SMS, token=None))[0] == 401
        assert (await post(edge, SMS, token="wrong"))[0] == 401
        assert (await post(edge, SMS, token=SECRET))[0] == 401  # the notification secret is not the API token
        status, body = await post(edge, SMS, tenant="nobody")
        assert status == 401 and body["field"] == "Authorization"
        # what may be asked: the field and the reason
        refusals = [
            (b"not json", None),
            ({**SMS, "kind": "fax"}, "kind"),
            ({k: v for k, v in SMS.items() if k != "message"}, "message"),
            ({**SMS, "message": "x" * 161}, "message"),
            ({**SMS, "callee": "+33 6 12"}, "callee"),
            ({**SMS, "profile": "Fermé"}, "profile"),
            ({**SMS, "send_twice": True}, "send_twice"),
            ({**SMS, "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
            ({"kind": "connect", "account": LINE, "callee": "33612345678"}, "caller"),
        ]
        for request, field in refusals:
            status, body = await post(edge, request)
            assert status == 400, (request, body)
            assert body["field"] == field, (request, body)
        # idempotency: the same key twice is the same action
        first = await post(edge, SMS, headers={"Idempotency-Key": "order-1234"})
        again = await post(edge, SMS, headers={"Idempotency-Key": "order-1234"})
        assert first[0] == again[0] == 202 and first[1]["action_id"] == again[1]["action_id"]
        aid = first[1]["action_id"]
        other = await post(edge, {**SMS, "message": "Autre message"})
        assert other[0] == 202 and other[1]["action_id"] != aid
        # accepted, not yet executed
        assert (await get(edge, aid))[1]["status"] == "accepted"
        # another tenant cannot see it; an unknown id is not found
        assert (await get(edge, aid, tenant="globex"))[0] == 404
        assert (await get(edge, "0" * 32))[0] == 404

        async with executor(broker.bootstrap, prefix, url):
            async def sent() -> bool:
                status, body = await get(edge, aid)
                return status == 200 and body["status"] == "sent"

            await wait_for(sent, 60, interval=0.3, what="the API action's result at the edge")
            await wait_for(lambda: len([r for r in sb.requests if r["executed"]]) == 2, 30, what="both sent")
        status, body = await get(edge, aid)
        assert body["final"] is True and body["tenant"] == "acme" and body["kind"] == "sms"
    actions = await read_values(broker.bootstrap, ACTIONS.full_name(prefix))
    on_topic = [a for a in actions if a["action_id"] == aid]
    assert len(on_topic) == 2  # both requests were written ...
    executed = [r for r in sb.requests if r["executed"] and r["params"]["MSG"] == SMS["message"]]
    assert len(executed) == 1  # ... and the executor sent it once
    results = await read_values(broker.bootstrap, ACTION_RESULTS.full_name(prefix))
    assert {r["status"] for r in results if r["action_id"] == aid} == {"sending", "sent"}
    rejected = await read_values(broker.bootstrap, edge.rejected_topic)
    assert len([r for r in rejected if "/actions" in str(r["path"])]) == len(refusals)
    assert API_TOKEN not in json.dumps(rejected)
