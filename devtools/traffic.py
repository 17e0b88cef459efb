"""The guide's two example calls (keyyo.md), as GET query parameters, with fixed timings.

Tests use them where exact values matter; ``devtools.simulator`` generates the full mix.
"""

from __future__ import annotations

import random
import secrets

Params = dict[str, str]


def new_dref() -> str:
    """A DREF like Keyyo's: 32 lowercase hex digits."""
    return secrets.token_hex(16)


def new_callref() -> str:
    """A call reference."""
    return str(random.randint(10**11, 10**12 - 1))


def _notif(kind: str, account: str, caller: str, callee: str, callref: str, dref: str,
           tsms: int, **extra: str) -> Params:
    params = {
        "account": account, "caller": caller, "callee": callee, "callref": callref,
        "type": kind, "version": "1", "dref": dref, "dref_replace": "", "session_id": "",
        "is_acd": "0", "redirecting_number": "", "tsms": str(tsms),
    }
    params.update(extra)
    return params


def answered_incoming(line: str, caller: str, start_ms: int, ring_ms: int = 4000,
                      talk_ms: int = 30000) -> list[Params]:
    """The guide's example: SETUP, CONNECT, RELEASE on ``line``, all other values identical."""
    callref, dref = new_callref(), new_dref()
    return [
        _notif("SETUP", line, caller, line, callref, dref, start_ms),
        _notif("CONNECT", line, caller, line, callref, dref, start_ms + ring_ms),
        _notif("RELEASE", line, caller, line, callref, dref, start_ms + ring_ms + talk_ms),
    ]


def intercepted_incoming(line_a: str, line_b: str, caller: str, start_ms: int) -> list[Params]:
    """The guide's interception: A rings, B picks it up with DREF_REPLACE = A's dref.

    In B's dialog the interceptor is CALLER and the original caller is CALLEE; A only gets
    SETUP and RELEASE.
    """
    callref, callref_b, dref_a, dref_b = new_callref(), new_callref(), new_dref(), new_dref()
    return [
        _notif("SETUP", line_a, caller, line_a, callref, dref_a, start_ms),
        _notif("SETUP", line_b, line_b, caller, callref_b, dref_b, start_ms + 3000,
               dref_replace=dref_a),
        _notif("RELEASE", line_a, caller, line_a, callref, dref_a, start_ms + 3100),
        _notif("CONNECT", line_b, line_b, caller, callref_b, dref_b, start_ms + 3200,
               dref_replace=dref_a),
        _notif("RELEASE", line_b, line_b, caller, callref_b, dref_b, start_ms + 40000,
               dref_replace=dref_a),
    ]
