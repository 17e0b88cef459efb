"""Readable call flows for the pure call-records tests, and a driver with a test clock.

    incoming_call(to="33100000001").rings("33100000001").answers("33100000001").hangs_up()

Each step adds the notifications Keyyo would send, with event times advancing by ``after``
seconds (default 1). ``run(events)`` folds them into a fresh store in order, firing timers as
stream time advances, and then moves time far enough that every call closes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ingest.parsing import event_id
from processors.call_records import CallRecords, CallRecordsConfig
from processors.driver import Driver
from processors.state import Store
from schemas.notification import Notification, parse_rfc3339_ms, rfc3339_ms
from schemas.topics import CALL_RECORDS, CALL_UPDATES, DEAD_LETTERS

T0 = 1_795_000_000_000
EXTERNAL = "33612345678"
_counter = itertools.count(1)


def _dref() -> str:
    return f"{next(_counter):032x}"


@dataclass
class Dialog:
    """One leg as Keyyo notifies it."""

    account: str
    caller: str
    callee: str
    dref: str = field(default_factory=_dref)
    callref: str = field(default_factory=lambda: str(100000 + next(_counter)))
    dref_replace: str | None = None


@dataclass
class Flow:
    """A call being written, step by step."""

    tenant: str = "acme"
    session_id: str | None = None
    is_acd: bool = False
    redirecting: str | None = None
    t: int = T0
    events: list[Notification] = field(default_factory=list)
    dialogs: dict[str, Dialog] = field(default_factory=dict)
    caller: str = EXTERNAL
    direction: str = "inbound"
    minimal: bool = False
    """Notified through Keyyo's minimal URL template (no DREF, CALLREF, session)."""

    def _emit(self, kind: str, d: Dialog, after: float, callee: str | None = None) -> Flow:
        self.t += int(after * 1000)
        callee = callee or d.callee
        if self.minimal:  # Keyyo's minimal URL template: account, caller, callee, type (and tsms)
            self.events.append(Notification(
                event_id=event_id(self.tenant, d.account, None, kind, None, d.caller, callee, self.t),
                tenant=self.tenant, type=kind, account=d.account, caller=d.caller,  # type: ignore[arg-type]
                callee=callee, callref=None, dref=None, dref_replace=None, session_id=None, is_acd=False,
                redirecting_number=None, version=1, event_time=rfc3339_ms(self.t),
                received_at=rfc3339_ms(self.t), source_ip="127.0.0.1"))
            return self
        self.events.append(Notification(
            event_id=event_id(self.tenant, d.account, d.dref, kind, d.callref), tenant=self.tenant,
            type=kind, account=d.account, caller=d.caller, callee=callee,  # type: ignore[arg-type]
            callref=d.callref, dref=d.dref, dref_replace=d.dref_replace, session_id=self.session_id,
            is_acd=self.is_acd, redirecting_number=self.redirecting, version=1,
            event_time=rfc3339_ms(self.t), received_at=rfc3339_ms(self.t), source_ip="127.0.0.1"))
        return self

    def rings(self, line: str, after: float = 0, callref: str | None = None) -> Flow:
        """SETUP on ``line`` for the incoming call (a new dialog)."""
        inbound = self.direction == "inbound"
        d = Dialog(line, self.caller, line) if inbound else Dialog(line, line, self.caller)
        if callref is not None:
            d.callref = callref
        self.dialogs[line] = d
        return self._emit("SETUP", d, after)

    def answers(self, line: str, after: float = 1, voicemail: str | None = None) -> Flow:
        """CONNECT on ``line``'s dialog (optionally with a voicemail answering number)."""
        return self._emit("CONNECT", self.dialogs[line], after, callee=voicemail)

    def hangs_up(self, line: str | None = None, after: float = 1) -> Flow:
        """RELEASE on ``line``'s dialog (every open dialog when ``line`` is None)."""
        lines = [line] if line else list(self.dialogs)
        for i, name in enumerate(lines):
            self._emit("RELEASE", self.dialogs[name], after if i == 0 else 0)
        return self

    def intercepted_by(self, line: str, original: str, after: float = 1) -> Flow:
        """``line`` picks up the call ringing on ``original`` (DREF_REPLACE = its dref)."""
        d = Dialog(line, line, self.caller, dref_replace=self.dialogs[original].dref)
        self.dialogs[line] = d
        return self._emit("SETUP", d, after)


def incoming_call(tenant: str = "acme", acd_session: str | None = None,
                  redirecting: str | None = None, caller: str = EXTERNAL, at: int = T0,
                  minimal: bool = False) -> Flow:
    """An inbound call from ``caller`` (an ACD call when ``acd_session`` is given), its first
    event at ``at`` (ms) plus the first step's ``after``."""
    return Flow(tenant=tenant, session_id=acd_session, is_acd=acd_session is not None,
                redirecting=redirecting, caller=caller, t=at, minimal=minimal)


def outgoing_call(to: str = EXTERNAL, tenant: str = "acme") -> Flow:
    """An outbound call from a line to ``to``."""
    return Flow(tenant=tenant, caller=to, direction="outbound")


@dataclass
class Result:
    """What the logic emitted."""

    records: list[dict[str, Any]]
    updates: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    store: Store


def run(events: list[Notification], config: CallRecordsConfig | None = None,
        settle_ms: int = 10 * 3600_000) -> Result:
    """Fold ``events`` in order through the runtime's step (replay mode: stream time = highest
    event time of the tenant), then let every call close."""
    driver = Driver(CallRecords(config))
    for n in events:
        driver.send(n.tenant.encode(), n.to_json(), parse_rfc3339_ms(n.event_time))
    driver.flush(settle_ms)  # every call closes
    driver.flush(settle_ms)  # and is forgotten after its retention
    return Result(
        records=driver.values(CALL_RECORDS.name),
        updates=driver.values(CALL_UPDATES.name),
        dead_letters=driver.values(DEAD_LETTERS.name),
        store=driver.store,
    )
