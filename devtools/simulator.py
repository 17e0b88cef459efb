"""A simulator of Keyyo's notification traffic, with the records it expects (ground truth).

Call flows follow ``../shared/docs/keyyo.md``: inbound answered and missed, outbound answered and
unanswered, internal, ACD calls ringing several agents at once or one after another (answered,
abandoned, or overflowing to voicemail), interception and attended transfer (DREF_REPLACE),
forwarding (REDIRECTING_NUMBER), voicemail. Event times (``tsms``) follow the wall clock,
compressed by ``time_scale``. Chaos knobs duplicate, reorder, delay, or drop a RELEASE. The
expected record of each call is computed from the flow's own description (not by the
processor's code), with the README's definitions.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.notification import rfc3339_ms

SCENARIOS = (
    "inbound_answered", "inbound_missed", "outbound_answered", "outbound_unanswered", "internal",
    "acd_simultaneous_answered", "acd_simultaneous_abandoned", "acd_sequential_answered",
    "acd_sequential_abandoned", "acd_voicemail", "interception", "attended_transfer", "forwarded",
    "voicemail",
)


@dataclass
class Leg:
    """One dialog of a planned call."""

    account: str
    caller: str
    callee: str
    dref: str = field(default_factory=lambda: secrets.token_hex(16))
    callref: str = field(default_factory=lambda: str(random.randint(10**11, 10**12 - 1)))
    replaces: str | None = None
    setup_at: int | None = None
    connect_at: int | None = None
    release_at: int | None = None
    answering_number: str | None = None


@dataclass
class PlannedCall:
    """A call: its legs with times, and the facts the expected record needs."""

    tenant: str
    scenario: str
    direction: str
    outcome: str
    legs: list[Leg]
    session_id: str | None = None
    redirecting_number: str | None = None
    dropped: set[str] = field(default_factory=set)
    """DREFs whose RELEASE is never sent."""
    minimal: bool = False
    """Sent through Keyyo's minimal URL template: account, caller, callee, type and tsms only."""

    def notifications(self) -> list[dict[str, str]]:
        """The GET parameters Keyyo would send, in event-time order (dropped ones left out)."""
        out: list[tuple[int, int, dict[str, str]]] = []
        for i, leg in enumerate(self.legs):
            for kind, at in (("SETUP", leg.setup_at), ("CONNECT", leg.connect_at),
                             ("RELEASE", leg.release_at)):
                if at is None or (kind == "RELEASE" and leg.dref in self.dropped):
                    continue
                callee = leg.answering_number if kind == "CONNECT" and leg.answering_number else leg.callee
                if self.minimal:
                    out.append((at, i, {"account": leg.account, "caller": leg.caller, "callee": callee,
                                        "type": kind, "tsms": str(at)}))
                    continue
                out.append((at, i, {
                    "account": leg.account, "caller": leg.caller, "callee": callee,
                    "callref": leg.callref, "type": kind, "version": "1", "dref": leg.dref,
                    "dref_replace": leg.replaces or "", "session_id": self.session_id or "",
                    "is_acd": "1" if self.session_id else "0",
                    "redirecting_number": self.redirecting_number or "", "tsms": str(at),
                }))
        return [p for _, _, p in sorted(out, key=lambda x: (x[0], x[1]))]

    def expected(self) -> dict[str, Any]:
        """The record the processor should produce (record_id and revision aside)."""
        legs = sorted(self.legs, key=lambda leg: (leg.setup_at, leg.dref))
        sent = [int(p["tsms"]) for p in self.notifications()]
        started = min(leg.setup_at for leg in legs if leg.setup_at is not None)
        connected = sorted((leg for leg in legs if leg.connect_at is not None),
                           key=lambda leg: (leg.connect_at, leg.dref))
        answered = connected[0].connect_at if connected else None
        timeout = bool(self.dropped)
        releases = [leg.release_at for leg in legs
                    if leg.release_at is not None and leg.dref not in self.dropped]
        ended = max(sent) if timeout else max(releases)

        def secs(a: int | None, b: int | None) -> float:
            return round(max(0, b - a) / 1000, 3) if a is not None and b is not None else 0.0

        def iso(ms: int | None) -> str | None:
            return rfc3339_ms(ms) if ms is not None else None

        first = legs[0]
        voicemail = bool(connected) and connected[0].answering_number is not None
        record: dict[str, Any] = {
            "schema": "keyyo.call-record.v1", "tenant": self.tenant, "direction": self.direction,
            "outcome": self.outcome, "caller": first.caller, "callee": first.callee,
            "answered_by": connected[0].account if connected and not voicemail else None,
            "started_at": iso(started), "answered_at": iso(answered), "ended_at": iso(ended),
            "wait_seconds": secs(started, answered if answered is not None else ended),
            "talk_seconds": secs(answered, ended) if answered is not None else 0.0,
            "duration_seconds": secs(started, ended), "is_acd": self.session_id is not None,
            "session_id": self.session_id, "transferred": any(leg.replaces for leg in legs),
            "redirecting_number": self.redirecting_number,
            "legs": [{
                "dref": leg.dref, "callref": leg.callref, "account": leg.account,
                "caller": leg.caller, "callee": leg.callee, "setup_at": iso(leg.setup_at),
                "connect_at": iso(leg.connect_at),
                "release_at": None if leg.dref in self.dropped else iso(leg.release_at),
                "replaces": leg.replaces,
            } for leg in legs],
            "closed_by": "timeout" if timeout else "release",
            "correlation": "exact",
        }
        if self.minimal:  # what the minimal template carries: no DREF, CALLREF, session, forwarding
            record.update(session_id=None, redirecting_number=None, is_acd=False, transferred=False,
                          correlation="approximate")
            for leg in record["legs"]:
                leg.update(dref=None, callref=None, replaces=None)
        return record


class Planner:
    """Plans calls of every scenario for a set of tenants and lines."""

    def __init__(self, tenants: list[str], lines_per_tenant: int, rng: random.Random,
                 time_scale: float = 1.0) -> None:
        self.rng = rng
        self.scale = time_scale
        self.lines = {
            t: [f"33{100 + i:03d}{j:06d}" for j in range(lines_per_tenant)]
            for i, t in enumerate(tenants)
        }

    def _d(self, low: float, high: float) -> int:
        """A duration in ms, scaled."""
        return max(20, int(self.rng.uniform(low, high) * 1000 * self.scale))

    def _external(self) -> str:
        return "336" + str(self.rng.randint(10**7, 10**8 - 1))

    def plan(self, start_ms: int, scenario: str | None = None, tenant: str | None = None) -> PlannedCall:
        """One call starting at ``start_ms``."""
        rng = self.rng
        tenant = tenant or rng.choice(sorted(self.lines))
        lines = self.lines[tenant]
        kind = scenario or rng.choice(SCENARIOS)
        ext = self._external()
        t = start_ms
        ring, talk, eps = self._d(1, 6), self._d(3, 40), max(5, int(50 * self.scale))
        a, b, c = rng.sample(lines, 3)
        if kind in ("inbound_answered", "inbound_missed", "voicemail", "forwarded"):
            leg = Leg(a, ext, a, setup_at=t)
            redirecting = b if kind == "forwarded" else None
            if kind == "inbound_missed":
                leg.release_at = t + ring
                return PlannedCall(tenant, kind, "inbound", "missed", [leg])
            leg.connect_at, leg.release_at = t + ring, t + ring + talk
            if kind == "voicemail":
                leg.answering_number = "".join(rng.choice("0123456789") for _ in range(22))
                return PlannedCall(tenant, kind, "inbound", "voicemail", [leg])
            return PlannedCall(tenant, kind, "inbound", "answered", [leg],
                               redirecting_number=redirecting)
        if kind in ("outbound_answered", "outbound_unanswered"):
            leg = Leg(a, a, ext, setup_at=t)
            if kind == "outbound_unanswered":
                leg.release_at = t + ring
                return PlannedCall(tenant, kind, "outbound", "no_answer", [leg])
            leg.connect_at, leg.release_at = t + ring, t + ring + talk
            return PlannedCall(tenant, kind, "outbound", "answered", [leg])
        if kind == "internal":
            callref = str(rng.randint(10**11, 10**12 - 1))
            out = Leg(a, a, b, callref=callref, setup_at=t)
            inc = Leg(b, a, b, callref=callref, setup_at=t + eps)
            out.connect_at = inc.connect_at = t + ring
            out.release_at = inc.release_at = t + ring + talk
            return PlannedCall(tenant, kind, "internal", "answered", [out, inc])
        session = secrets.token_hex(20)
        if kind.startswith("acd_simultaneous"):
            agents = [Leg(x, ext, x, setup_at=t + i * eps) for i, x in enumerate((a, b, c))]
            answered = kind.endswith("answered") and not kind.endswith("abandoned")
            for leg in agents:
                leg.release_at = t + ring + eps * 3
            if answered:
                agents[1].connect_at = t + ring
                agents[1].release_at = t + ring + talk
            return PlannedCall(tenant, kind, "inbound", "answered" if answered else "abandoned",
                               agents, session_id=session)
        if kind.startswith("acd_sequential"):
            agents = []
            for i, x in enumerate((a, b, c)):
                leg = Leg(x, ext, x, setup_at=t + i * ring)
                leg.release_at = t + (i + 1) * ring - eps
                agents.append(leg)
            answered = kind.endswith("answered")
            if answered:
                last = agents[-1]
                last.connect_at = last.setup_at + ring // 2  # type: ignore[operator]
                last.release_at = last.connect_at + talk
            return PlannedCall(tenant, kind, "inbound", "answered" if answered else "abandoned",
                               agents, session_id=session)
        if kind == "acd_voicemail":
            # every agent rings in turn, no one answers: the queue overflows to voicemail
            agents = []
            for i, x in enumerate((a, b)):
                agents.append(Leg(x, ext, x, setup_at=t + i * ring, release_at=t + (i + 1) * ring - eps))
            last = Leg(c, ext, c, setup_at=t + 2 * ring, connect_at=t + 2 * ring + ring // 2,
                       answering_number="".join(rng.choice("0123456789") for _ in range(22)))
            last.release_at = last.connect_at + talk  # type: ignore[operator]
            return PlannedCall(tenant, kind, "inbound", "voicemail", [*agents, last], session_id=session)
        if kind == "interception":
            first = Leg(a, ext, a, setup_at=t, release_at=t + ring + eps)
            pick = Leg(b, b, ext, replaces=first.dref, setup_at=t + ring,
                       connect_at=t + ring + 2 * eps, release_at=t + ring + 2 * eps + talk)
            return PlannedCall(tenant, kind, "inbound", "answered", [first, pick])
        # attended transfer: A answers, then hands the caller over to B
        first = Leg(a, ext, a, setup_at=t, connect_at=t + ring)
        first.release_at = t + ring + talk + 3 * eps
        second = Leg(b, ext, b, replaces=first.dref, setup_at=t + ring + talk,
                     connect_at=t + ring + talk + 2 * eps, release_at=t + ring + 2 * talk)
        return PlannedCall(tenant, "attended_transfer", "inbound", "answered", [first, second])


@dataclass
class Chaos:
    """Probabilities of mishaps per notification (drop_release: per call)."""

    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    delay_ms: int = 1500
    drop_release: float = 0.0


@dataclass(order=True)
class Send:
    """A notification scheduled for sending at ``due`` (wall-clock ms)."""

    due: int
    seq: int
    tenant: str = field(compare=False)
    params: dict[str, str] = field(compare=False)


def schedule(calls: list[PlannedCall], chaos: Chaos, rng: random.Random) -> list[Send]:
    """Every notification of ``calls`` with its send time, after chaos."""
    sends: list[Send] = []
    seq = 0
    for call in calls:
        for params in call.notifications():
            due = int(params["tsms"])
            if rng.random() < chaos.delay:
                due += chaos.delay_ms
            copies = 2 if rng.random() < chaos.duplicate else 1
            for _ in range(copies):
                sends.append(Send(due, seq, call.tenant, params))
                seq += 1
    sends.sort()
    for i in range(len(sends) - 1):
        if rng.random() < chaos.reorder:
            a, b = sends[i], sends[i + 1]
            sends[i] = Send(a.due, a.seq, b.tenant, b.params)
            sends[i + 1] = Send(b.due, b.seq, a.tenant, a.params)
    return sends


def plan_traffic(planner: Planner, rate: float, duration: float, start_ms: int, chaos: Chaos,
                 scenarios: list[str] | None = None) -> list[PlannedCall]:
    """Calls starting at ``rate`` per second for ``duration`` seconds (Poisson arrivals)."""
    rng = planner.rng
    calls: list[PlannedCall] = []
    t = float(start_ms)
    end = start_ms + duration * 1000
    i = 0
    while True:
        t += rng.expovariate(rate) * 1000 if rate > 0 else end
        if t >= end:
            break
        kind = scenarios[i % len(scenarios)] if scenarios else None
        call = planner.plan(int(t), kind)
        if rng.random() < chaos.drop_release:
            call.dropped.add(rng.choice(call.legs).dref)
        calls.append(call)
        i += 1
    return calls


Sender = Callable[[str, dict[str, str]], "asyncio.Future[int] | Any"]


async def play(sends: list[Send], send: Callable[[str, dict[str, str]], Any],
               clock: Callable[[], int], progress: Callable[[str], None] | None = None,
               concurrency: int = 64) -> dict[str, int]:
    """Send each notification at its due time (at most ``concurrency`` in flight)."""
    statuses: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    last_report = time.monotonic()

    async def one(s: Send) -> None:
        async with gate:
            status = str(await send(s.tenant, s.params))
        statuses[status] = statuses.get(status, 0) + 1

    for n, s in enumerate(sends, 1):
        wait = (s.due - clock()) / 1000
        if wait > 0:
            await asyncio.sleep(wait)
        task = asyncio.create_task(one(s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if progress is not None and time.monotonic() - last_report >= 2:
            last_report = time.monotonic()
            progress(f"sent {n}/{len(sends)} notifications; answers {dict(sorted(statuses.items()))}")
    if tasks:
        await asyncio.gather(*tasks)
    return statuses
