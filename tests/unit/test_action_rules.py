"""Action rules, pure: each rule and each suppression, through the runtime's own step (in-memory
driver) with call records built by hand, plus one flow from notifications to an SMS."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from typing import Any

import jsonschema
import orjson
import pytest

from processors.action_rules import REMEMBER_MS, ActionRulesLogic, next_occurrence, quiet_until
from processors.action_rules_config import RulesConfig, RulesError, parse_rules
from processors.driver import Driver
from schemas.actions import action_id
from schemas.call_record import CALL_RECORD_SCHEMA
from schemas.notification import parse_rfc3339_ms, rfc3339_ms
from schemas.topics import ACTION_RESULTS, ACTIONS, DEAD_LETTERS
from tests.scenarios import incoming_call, run

ACTION = jsonschema.Draft202012Validator(json.loads(
    resources.files("schemas").joinpath("json/keyyo.action.v1.schema.json").read_text()))
RESULT = jsonschema.Draft202012Validator(json.loads(
    resources.files("schemas").joinpath("json/keyyo.action-result.v1.schema.json").read_text()))
LINE, AGENT, MOBILE, LANDLINE = "33123456789", "33100000001", "33612345678", "33145678901"
NOON = parse_rfc3339_ms("2026-11-18T11:00:00Z")  # 12:00 in Paris, a Wednesday
MIN = 60_000
_ids = itertools.count(1)

SMS_RULE = """
[[tenants.acme.rules]]
name = "missed-call-sms"
when = ["missed", "abandoned"]
action = "sms"
message = "Bonjour, nous avons manqué votre appel. Nous vous rappelons vite."
"""


def rules(text: str = SMS_RULE) -> RulesConfig:
    import tomllib

    return parse_rules(tomllib.loads(text))


def record(outcome: str = "missed", *, at: int = NOON, caller: str = MOBILE, callee: str = LINE,
           direction: str = "inbound", revision: int = 1, record_id: str | None = None,
           tenant: str = "acme", talk: float = 0.0) -> dict[str, Any]:
    """A call record as call-records writes it (only what the rules read matters)."""
    rid = record_id or f"r{next(_ids):06d}"
    ended = at + 20_000 + int(talk * 1000)
    return {
        "schema": CALL_RECORD_SCHEMA, "record_id": rid, "tenant": tenant, "revision": revision,
        "direction": direction, "outcome": outcome, "caller": caller, "callee": callee,
        "answered_by": callee if outcome == "answered" and direction == "inbound" else None,
        "started_at": rfc3339_ms(at), "answered_at": None, "ended_at": rfc3339_ms(ended),
        "wait_seconds": 20.0, "talk_seconds": talk, "duration_seconds": 20.0 + talk, "is_acd": False,
        "session_id": None, "transferred": False, "redirecting_number": None, "legs": [],
        "closed_by": "release", "correlation": "exact"}


class Rules:
    """A rules processor partition in memory (live mode: delays follow the test's wall clock)."""

    def __init__(self, config: RulesConfig, wall_ms: int = NOON) -> None:
        self.driver = Driver(ActionRulesLogic(config), mode="live", processor="action-rules",
                             wall_ms=wall_ms)

    def send(self, rec: dict[str, Any]) -> None:
        self.driver.send(rec["tenant"].encode(), orjson.dumps(rec), parse_rfc3339_ms(rec["ended_at"]))

    def at(self, wall_ms: int) -> None:
        self.driver.tick(wall_ms)

    def actions(self) -> list[dict[str, Any]]:
        return self._written(ACTIONS.name, ACTION, "tenant")

    def results(self) -> list[dict[str, Any]]:
        return self._written(ACTION_RESULTS.name, RESULT, "action_id")

    def _written(self, topic: str, schema: Any, key_field: str) -> list[dict[str, Any]]:
        """Values written to ``topic``, each valid against its schema and keyed by ``key_field``."""
        out = []
        for o in self.driver.outputs:
            if o.topic == topic:
                value = orjson.loads(o.rendered())
                schema.validate(value)
                assert o.key == value[key_field].encode()
                out.append(value)
        return out


def test_a_missed_call_texts_the_caller_from_the_line_that_was_called() -> None:
    r = Rules(rules())
    rec = record("missed")
    r.send(rec)
    [sms] = r.actions()
    assert sms["kind"] == "sms" and sms["account"] == LINE and sms["callee"] == MOBILE
    assert sms["message"] == "Bonjour, nous avons manqué votre appel. Nous vous rappelons vite."
    assert sms["action_id"] == action_id("acme", "rule", "missed-call-sms", rec["record_id"])
    assert sms["origin"] == {"rule": "missed-call-sms", "record_id": rec["record_id"], "revision": 1}
    # expires two hours after the call ended (the sms default)
    assert parse_rfc3339_ms(sms["expires_at"]) == parse_rfc3339_ms(rec["ended_at"]) + 2 * 3600_000
    assert r.results() == []


def test_answered_and_outbound_calls_and_other_tenants_get_nothing() -> None:
    r = Rules(rules())
    r.send(record("answered", talk=30))
    r.send(record("no_answer", direction="outbound", caller=LINE, callee=MOBILE))
    r.send(record("missed", tenant="other"))
    assert r.actions() == [] and r.results() == []


def test_one_action_per_rule_and_call_whatever_the_revisions_and_duplicates() -> None:
    r = Rules(rules())
    rec = record("missed", record_id="rcall1")
    for revision in (1, 1, 2, 3, 2):
        r.send({**rec, "revision": revision})
    assert len(r.actions()) == 1
    # a revision arriving hours later still finds the decision (remembered 48 h)
    r.at(NOON + REMEMBER_MS - 60 * MIN)
    r.send({**rec, "revision": 4})
    assert len(r.actions()) == 1


def test_the_message_template_takes_the_calls_fields() -> None:
    r = Rules(rules(SMS_RULE.replace("Nous vous rappelons vite.", "Appel de {caller} à {time} le {date}.")))
    r.send(record("missed"))
    assert r.actions()[0]["message"].endswith(f"Appel de {MOBILE} à 12:00 le 18/11.")


def test_hidden_and_landline_callers_get_no_sms_unless_allowed() -> None:
    r = Rules(rules())
    for caller in ("anonymous", "", LANDLINE):
        r.send(record("missed", caller=caller))
    assert r.actions() == []
    reasons = [x["reason"] for x in r.results()]
    assert all(x["status"] == "suppressed" for x in r.results())
    assert reasons[0] == reasons[1] == "the caller's number is hidden"
    assert "does not look like a mobile" in reasons[2]
    r2 = Rules(rules(SMS_RULE + "sms_to_landlines = true\n"))
    r2.send(record("missed", caller=LANDLINE))
    assert [a["callee"] for a in r2.actions()] == [LANDLINE]


def test_national_and_plus_forms_of_a_mobile_are_mobiles() -> None:
    r = Rules(rules())
    r.send(record("missed", caller="0612345678"))
    r.send(record("missed", caller="+33712345678"))
    assert len(r.actions()) == 2


DELAYED = SMS_RULE + "delay = 600\n"


def test_a_delay_waits_then_sends() -> None:
    r = Rules(rules(DELAYED))
    rec = record("missed")
    r.send(rec)
    assert r.actions() == []
    ended = parse_rfc3339_ms(rec["ended_at"])
    r.at(ended + 599_000 + 5000)  # live: stream time = wall - 5 s lateness
    assert r.actions() == []
    r.at(ended + 600_000 + 5000)
    [sms] = r.actions()
    assert parse_rfc3339_ms(sms["not_before"]) == ended + 600_000


def test_a_callback_during_the_delay_cancels_the_sms() -> None:
    r = Rules(rules(DELAYED))
    rec = record("missed")
    r.send(rec)
    # an agent calls the customer back five minutes later, and the customer answers
    r.at(NOON + 5 * MIN)
    r.send(record("answered", at=NOON + 5 * MIN, direction="outbound", caller=AGENT, callee=MOBILE, talk=40))
    r.at(NOON + 60 * MIN)
    assert r.actions() == []
    [res] = r.results()
    assert res["status"] == "suppressed" and res["reason"] == "the caller was called back"
    assert res["origin"]["record_id"] == rec["record_id"]


def test_an_answered_call_from_the_caller_during_the_delay_cancels_the_sms() -> None:
    r = Rules(rules(DELAYED))
    r.send(record("missed", caller="+33612345678"))
    r.send(record("answered", at=NOON + 2 * MIN, caller="0612345678", talk=10))  # same number, other form
    r.at(NOON + 60 * MIN)
    assert r.actions() == []
    assert [x["reason"] for x in r.results()] == ["the caller called again and was answered"]


def test_an_unanswered_callback_or_another_number_does_not_cancel() -> None:
    r = Rules(rules(DELAYED))
    r.send(record("missed"))
    r.send(record("no_answer", at=NOON + MIN, direction="outbound", caller=AGENT, callee=MOBILE))
    r.send(record("answered", at=NOON + 2 * MIN, caller="33699999999", talk=10))
    r.at(NOON + 60 * MIN)
    assert len(r.actions()) == 1 and r.results() == []


def test_a_restatement_as_answered_during_the_delay_cancels() -> None:
    r = Rules(rules(DELAYED))
    rec = record("missed", record_id="rlate")
    r.send(rec)
    r.send({**rec, "revision": 2, "outcome": "answered", "answered_by": LINE})
    r.at(NOON + 60 * MIN)
    assert r.actions() == []
    assert [x["reason"] for x in r.results()] == ["the call was restated as answered"]


QUIET = SMS_RULE.replace("[[tenants.acme.rules]]", '[tenants.acme]\nquiet_hours = ["20:00", "08:30"]\n'
                         '[[tenants.acme.rules]]')


def test_quiet_hours_defer_to_their_end() -> None:
    r = Rules(rules(QUIET))
    late = parse_rfc3339_ms("2026-11-18T21:30:00Z")  # 22:30 in Paris
    r.at(late)
    r.send(record("missed", at=late))
    [sms] = r.actions()
    assert sms["not_before"] == "2026-11-19T07:30:00.000Z"  # 08:30 in Paris, next morning
    assert sms["expires_at"] == "2026-11-19T09:30:00.000Z"  # the rule's 2 h from then


def test_quiet_hours_drop_when_asked() -> None:
    r = Rules(rules(QUIET.replace("[[tenants.acme.rules]]", 'quiet = "drop"\n[[tenants.acme.rules]]')))
    early = parse_rfc3339_ms("2026-11-18T06:00:00Z")  # 07:00 in Paris
    r.at(early)
    r.send(record("missed", at=early))
    assert r.actions() == []
    assert [x["reason"] for x in r.results()] == ["decided during the tenant's quiet hours"]


def test_no_quiet_hours_unless_configured() -> None:
    r = Rules(rules())
    late = parse_rfc3339_ms("2026-11-18T23:30:00Z")
    r.at(late)
    r.send(record("missed", at=late))
    [sms] = r.actions()
    assert parse_rfc3339_ms(sms["not_before"]) == late + 20_000


def test_the_hourly_cap_stops_a_runaway_rule_per_tenant() -> None:
    r = Rules(rules(SMS_RULE.replace("[[tenants.acme.rules]]",
                                     "[tenants.acme]\nmax_actions_per_hour = 3\n[[tenants.acme.rules]]")
                    + SMS_RULE.replace("acme", "other")))
    for i in range(5):
        r.send(record("missed", at=NOON + i * 1000))
    r.send(record("missed", at=NOON + 6000, tenant="other"))  # another tenant is not capped by acme's
    assert [a["tenant"] for a in r.actions()] == ["acme"] * 3 + ["other"]
    assert [x["status"] for x in r.results()] == ["suppressed", "suppressed"]
    assert "cap of 3 rule actions per hour" in r.results()[0]["reason"]
    # the next hour starts a new count
    r.at(NOON + 65 * MIN)
    r.send(record("missed", at=NOON + 61 * MIN))
    assert len(r.actions()) == 5


def test_a_record_decided_past_its_expiry_is_expired_not_sent() -> None:
    r = Rules(rules(), wall_ms=NOON + 3 * 3600_000)  # the processor catches up three hours late
    r.send(record("missed"))
    assert r.actions() == []
    assert [x["status"] for x in r.results()] == ["expired"]


CALLBACK = f"""
[[tenants.acme.rules]]
name = "acd-callback"
when = ["abandoned"]
action = "connect"
agent = "{AGENT}"
callee_name = "Rappel client"
"""


def test_an_abandoned_call_gets_a_callback_agent_first() -> None:
    r = Rules(rules(CALLBACK))
    r.send(record("missed"))  # not abandoned: no callback
    r.send(record("abandoned", callee="33900000000"))
    [cb] = r.actions()
    assert (cb["kind"], cb["account"], cb["caller"], cb["callee"], cb["callee_name"]) == (
        "connect", AGENT, AGENT, MOBILE, "Rappel client")
    assert parse_rfc3339_ms(cb["expires_at"]) - parse_rfc3339_ms(cb["not_before"]) == 15 * MIN


SCHEDULE = f"""
[[tenants.acme.schedules]]
name = "closed-evenings"
line = "{LINE}"
profile = "Fermé"
at = "18:00"
days = ["mon", "tue", "wed", "thu", "fri"]
"""


def test_a_schedule_switches_the_profile_at_local_times_on_its_days() -> None:
    r = Rules(rules(SCHEDULE))
    r.send(record("answered", talk=5))  # the tenant's first record arms its schedules
    for day in range(18, 25):  # Wednesday 18 to Tuesday 24 November
        r.at(parse_rfc3339_ms(f"2026-11-{day:02d}T17:00:10Z"))  # 18:00:10 in Paris (+5 s lateness)
    switches = r.actions()
    assert [(a["kind"], a["profile"], a["account"]) for a in switches] == [("profile", "Fermé", LINE)] * 5
    assert [a["not_before"][:10] for a in switches] == [
        "2026-11-18", "2026-11-19", "2026-11-20", "2026-11-23", "2026-11-24"]  # no weekend
    assert all(a["not_before"].endswith("T17:00:00.000Z") for a in switches)
    assert len({a["action_id"] for a in switches}) == 5


def test_a_tenant_without_any_call_gets_its_switches() -> None:
    """A partition's start arms the schedules of the tenants it holds, before any record."""
    r = Rules(rules(SCHEDULE))
    r.at(NOON)  # the partition's first transaction, as the processor starts
    for day in range(18, 21):
        r.at(parse_rfc3339_ms(f"2026-11-{day:02d}T17:00:10Z"))
    assert [a["not_before"] for a in r.actions()] == [
        f"2026-11-{day}T17:00:00.000Z" for day in (18, 19, 20)]


def test_starting_again_neither_rearms_nor_repeats_a_switch() -> None:
    r = Rules(rules(SCHEDULE))
    r.at(NOON)
    r.at(parse_rfc3339_ms("2026-11-18T17:00:10Z"))
    state = dict(r.driver.store.committed())
    assert any(key.startswith("s/acme/") for key in state), "the schedule was not armed"
    r.driver.restart()
    r.at(parse_rfc3339_ms("2026-11-18T17:30:00Z"))
    assert r.driver.store.committed() == state
    r.driver.restart()
    r.at(parse_rfc3339_ms("2026-11-19T17:00:10Z"))
    assert [a["not_before"][:10] for a in r.actions()] == ["2026-11-18", "2026-11-19"]


def test_a_partition_arms_only_the_schedules_of_its_own_tenants() -> None:
    two = rules(SCHEDULE + SCHEDULE.replace("tenants.acme", "tenants.other"))
    driver = Driver(ActionRulesLogic(two), mode="live", processor="action-rules", wall_ms=NOON,
                    owns=lambda key: key == b"other")
    driver.tick(NOON)
    driver.tick(parse_rfc3339_ms("2026-11-18T17:00:10Z"))
    assert [a["tenant"] for a in driver.values(ACTIONS.name)] == ["other"]


def test_a_schedule_follows_summer_time() -> None:
    tr = rules(SCHEDULE).tenants["acme"]
    sched = tr.schedules[0]
    # Friday 27 March 2026 (UTC+1), then Monday 30 March (UTC+2)
    assert rfc3339_ms(next_occurrence(sched, tr, parse_rfc3339_ms("2026-03-27T12:00:00Z"))) == \
        "2026-03-27T17:00:00.000Z"
    assert rfc3339_ms(next_occurrence(sched, tr, parse_rfc3339_ms("2026-03-27T18:00:00Z"))) == \
        "2026-03-30T16:00:00.000Z"


def test_a_switch_missed_while_the_processor_was_down_is_expired_not_made_late() -> None:
    r = Rules(rules(SCHEDULE))
    r.send(record("answered", talk=5))
    r.at(parse_rfc3339_ms("2026-11-18T20:00:00Z"))  # 3 h after 18:00 local
    assert r.actions() == []
    [res] = r.results()
    assert res["status"] == "expired" and res["origin"]["schedule"] == "closed-evenings"


def test_quiet_until_across_midnight() -> None:
    tr = rules(QUIET).tenants["acme"]
    assert quiet_until(tr, parse_rfc3339_ms("2026-11-18T12:00:00Z")) is None
    assert rfc3339_ms(quiet_until(tr, parse_rfc3339_ms("2026-11-18T19:00:00Z"))) == "2026-11-19T07:30:00.000Z"
    assert rfc3339_ms(quiet_until(tr, parse_rfc3339_ms("2026-11-19T05:00:00Z"))) == "2026-11-19T07:30:00.000Z"


def test_bad_records_are_dead_lettered_and_the_next_ones_still_count() -> None:
    r = Rules(rules())
    bad = record("missed")
    r.driver.send(b"acme", b"not json")
    r.driver.send(b"acme", orjson.dumps({**bad, "outcome": "lost"}))
    r.driver.send(b"other", orjson.dumps(bad))
    r.send(record("missed"))
    assert len(r.actions()) == 1
    reasons = [d["reason"] for d in r.driver.values(DEAD_LETTERS.name)]
    assert len(reasons) == 3 and reasons[1].startswith("outcome:") and reasons[2].startswith("key:")


@pytest.mark.parametrize(("text", "message"), [
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["lost"]\naction="sms"\nmessage="a"', "when"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="fax"', "action"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"', "message: required"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="{secret}"', "unknown field"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="' + "x" * 170 + '"', "160"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="connect"', "agent: required"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="a"\nfrom="abc"', "from"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="a"\ndelay=-1', "delay"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="a"\nsend_twice=true',
     "unknown key"),
    ('[tenants.acme]\ntimezone="Mars/Olympus"', "time zone"),
    ('[tenants.acme]\nquiet_hours=["25:00","08:00"]', "quiet_hours"),
    ('[[tenants.acme.schedules]]\nname="s"\nline="33123456789"\nprofile="p"\nat="18:00"\ndays=["sun","xyz"]',
     "days"),
    ('[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="a"\n'
     '[[tenants.acme.rules]]\nname="x"\nwhen=["missed"]\naction="sms"\nmessage="b"', "same name"),
])
def test_rules_file_mistakes_are_named(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        rules(text)


def test_a_missed_call_from_notifications_to_one_sms() -> None:
    """Keyyo's notifications of a missed call, through call-records, then the rules."""
    flow = incoming_call().rings(LINE).hangs_up(after=12)
    records = run(flow.events).records
    assert [x["outcome"] for x in records] == ["missed"]
    r = Rules(rules(), wall_ms=parse_rfc3339_ms(records[0]["ended_at"]))
    for rec in records:
        r.send(rec)
    [sms] = r.actions()
    assert (sms["account"], sms["callee"]) == (LINE, flow.caller)
