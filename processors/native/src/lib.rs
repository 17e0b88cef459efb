//! The common cases of `CallRecords` (processors/call_records.py) in Rust: decoding a notification
//! laid out as the edge writes it, folding a notification with a DREF whose index entries lead to
//! at most one call, and the timers of calls. It reads and stages state through the Python
//! `Store` and returns the same outputs, byte for byte, as the Python code; for anything else (no
//! DREF, calls to merge, a call at its bounds, a state value it does not know) it returns `None`
//! before touching the store, and the Python code does the work.
//!
//! The Python code is the specification: each step below names the Python it mirrors, and
//! tests/unit/test_native.py runs both over the same records and compares every output and every
//! state entry.

mod acd;
mod batch;
mod store;

/// The fold allocates a few small strings and buffers per notification (keys, values, decoded
/// calls): mimalloc does that ≈ 1.1× faster than the system's malloc over the whole fold
/// (interleaved in one process) and holds the calls kept decoded in less memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use acd::J;

use pyo3::prelude::*;
use pyo3::intern;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A JSON scalar as the state holds it (a leg's slot, a call's header field).
#[derive(Clone, Debug, PartialEq)]
enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
}

impl Val {
    /// Python's truth value of the same value.
    fn truthy(&self) -> bool {
        match self {
            Val::Null => false,
            Val::Bool(b) => *b,
            Val::Int(i) => *i != 0,
            Val::Str(s) => !s.is_empty(),
        }
    }

    /// A time slot: null or an integer (anything else is left to Python).
    fn time(&self) -> Option<Option<i64>> {
        match self {
            Val::Null => Some(None),
            Val::Int(i) => Some(Some(*i)),
            _ => None,
        }
    }
}

// A leg's positions, as in call_records.py.
const DREF: usize = 0;
const CALLREF: usize = 1;
const ACCOUNT: usize = 2;
const CALLER: usize = 3;
const CALLEE: usize = 4;
const SETUP_AT: usize = 5;
const CONNECT_AT: usize = 6;
const RELEASE_AT: usize = 7;
const REPLACES: usize = 8;
const SESSION_ID: usize = 9;
const IS_ACD: usize = 10;
const REDIRECTING: usize = 11;
const FIRST_AT: usize = 12;
const VOICEMAIL: usize = 13;
const APPROX: usize = 14;
const LEG_SLOTS: usize = 15;

/// A leg whose time slots are known to be null or integers (checked when it is read).
struct Leg {
    slots: Vec<Val>,
}

impl Leg {
    fn at(&self, slot: usize) -> Option<i64> {
        match self.slots[slot] {
            Val::Int(i) => Some(i),
            _ => None,
        }
    }
    fn first_at(&self) -> i64 {
        self.at(FIRST_AT).unwrap_or(0)
    }
    fn dref(&self) -> &str {
        match &self.slots[DREF] {
            Val::Str(s) => s,
            _ => "",
        }
    }
}

/// A call as `unpack_call` gives it (its id and tenant are the caller's).
struct Call {
    revision: Val,
    closed: Val,
    closed_by: Val,
    closed_at: Val,
    last_event: Val,
    events: Vec<String>,
    legs: Vec<Leg>,
}

impl Call {
    fn new() -> Call {
        Call {
            revision: Val::Int(0),
            closed: Val::Bool(false),
            closed_by: Val::Null,
            closed_at: Val::Null,
            last_event: Val::Null,
            events: Vec::new(),
            legs: Vec::new(),
        }
    }
}

fn scalar(value: &J<'_>) -> Option<Val> {
    Some(match value {
        J::Null => Val::Null,
        J::Bool(b) => Val::Bool(*b),
        J::Int(i) => Val::Int(*i),
        J::Str(s) => Val::Str((*s).to_owned()),
        J::Text(s) => Val::Str(s.clone()),
        _ => return None,
    })
}

/// `unpack_call` for the compact form; None for the object form or anything unexpected (and for
/// any value the narrow reader of `acd` leaves to Python: a long integer, a float).
fn unpack(raw: &[u8]) -> Option<Call> {
    let J::Arr(items) = acd::read_escaped(raw)? else { return None };
    if items.len() != 8 {
        return None;
    }
    let J::Arr(events) = &items[6] else { return None };
    let events = events
        .iter()
        .map(|e| match e {
            J::Str(s) => Some((*s).to_owned()),
            J::Text(s) => Some(s.clone()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let J::Arr(legs_raw) = &items[7] else { return None };
    let mut legs = Vec::with_capacity(legs_raw.len());
    for leg in legs_raw {
        let J::Arr(slots) = leg else { return None };
        let slots = slots.iter().map(scalar).collect::<Option<Vec<_>>>()?;
        if slots.len() != LEG_SLOTS
            || !matches!(slots[DREF], Val::Str(_))
            || !matches!(slots[FIRST_AT], Val::Int(_))
            || [SETUP_AT, CONNECT_AT, RELEASE_AT].iter().any(|&i| slots[i].time().is_none())
        {
            return None;
        }
        let leg = Leg { slots };
        if legs.iter().any(|l: &Leg| l.dref() == leg.dref()) {
            return None; // a dict keyed by DREF would keep one
        }
        legs.push(leg);
    }
    let last_event = scalar(&items[5])?;
    last_event.time()?;
    Some(Call {
        revision: scalar(&items[1])?,
        closed: scalar(&items[2])?,
        closed_by: scalar(&items[3])?,
        closed_at: scalar(&items[4])?,
        last_event,
        events,
        legs,
    })
}

// -- JSON as orjson writes it ---------------------------------------------------------------

/// A JSON string as orjson writes it: `"`, `\\` and the control characters escaped, the rest as is.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut rest = s.as_bytes();
    loop {
        let plain = plain_prefix(rest); // most strings are plain to their end: one copy
        out.extend_from_slice(&rest[..plain]);
        let Some(&b) = rest.get(plain) else { break };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 15) as usize]);
            }
        }
        rest = &rest[plain + 1..];
    }
    out.push(b'"');
}

/// How many bytes at the start of `bytes` need no escape in a JSON string (all of them when
/// none does). Eight at a time: a word has a byte below 0x20, a `"` or a `\\` exactly when one
/// of the three masks of `escapes` is non-zero (the "has a byte less than" and "has a zero byte"
/// tests of bit twiddling), and its lowest flagged byte is the first such byte (a borrow only
/// ever follows a byte that matched); then byte by byte in the last bytes, fewer than eight (a
/// word padded from them cost as much, in a copy). Per byte, the loop this replaced took
/// ≈ 4.6 % of a compiled drain.
fn plain_prefix(bytes: &[u8]) -> usize {
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let flagged = escapes(u64::from_le_bytes(word.try_into().expect("eight bytes")));
        if flagged != 0 {
            return i + (flagged.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = bytes.get(i) {
        if b < 0x20 || b == b'"' || b == b'\\' {
            break;
        }
        i += 1;
    }
    i
}

/// The high bit of each byte of `x` (little-endian) that may need an escape; the lowest one set
/// is exact.
fn escapes(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let control = x.wrapping_sub(ONES * 0x20) & !x;
    (control | (quote.wrapping_sub(ONES) & !quote) | (backslash.wrapping_sub(ONES) & !backslash)) & HIGH
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `text` as a JSON string, as the fold and the figures write it (for the tests).
#[pyfunction]
fn json_str<'py>(py: Python<'py>, text: &str) -> Bound<'py, PyBytes> {
    let mut out = Vec::with_capacity(text.len() + 2);
    put_str(&mut out, text);
    PyBytes::new(py, &out)
}

/// "00" to "99": decimal digits are written two at a time (one division per pair, not per digit;
/// a call's value and its update hold a dozen 13-digit times each).
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// The two digits of `n` (< 100).
fn pair(n: u64) -> [u8; 2] {
    let i = n as usize * 2;
    [PAIRS[i], PAIRS[i + 1]]
}

/// An integer in decimal, as Python writes it.
fn put_int(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    while n >= 100 {
        i -= 2;
        digits[i..i + 2].copy_from_slice(&pair(n % 100));
        n /= 100;
    }
    if n >= 10 {
        i -= 2;
        digits[i..i + 2].copy_from_slice(&pair(n));
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// Two decimal digits of `value` (0 <= value < 100).
fn put2(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&pair(value as u64));
}

/// Three decimal digits of `value` (0 <= value < 1000).
fn put3(out: &mut Vec<u8>, value: i64) {
    out.push(b'0' + (value / 100) as u8);
    put2(out, value % 100);
}

/// Four decimal digits of `value` (0 <= value < 10000).
fn put4(out: &mut Vec<u8>, value: i64) {
    put2(out, value / 100);
    put2(out, value % 100);
}

fn put_val(out: &mut Vec<u8>, v: &Val) {
    match v {
        Val::Null => out.extend_from_slice(b"null"),
        Val::Bool(true) => out.extend_from_slice(b"true"),
        Val::Bool(false) => out.extend_from_slice(b"false"),
        Val::Int(i) => put_int(out, *i),
        Val::Str(s) => put_str(out, s),
    }
}

/// A JSON array of `items`, each written by `put`.
fn put_list<T>(out: &mut Vec<u8>, items: impl IntoIterator<Item = T>, mut put: impl FnMut(&mut Vec<u8>, T)) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        put(out, item);
    }
    out.push(b']');
}

/// `pack_call`.
fn pack(call: &Call) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"[1,");
    for v in [&call.revision, &call.closed, &call.closed_by, &call.closed_at, &call.last_event] {
        put_val(&mut out, v);
        out.push(b',');
    }
    put_list(&mut out, &call.events, |out, e| put_str(out, e));
    out.push(b',');
    put_list(&mut out, &call.legs, |out, leg| put_list(out, &leg.slots, put_val));
    out.push(b']');
    out
}

// -- times ----------------------------------------------------------------------------------

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `parse_rfc3339_ms` of the contract's layout `YYYY-MM-DDTHH:MM:SS.mmmZ` (None for another).
fn parse_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':'
        || b[19] != b'.' || b[23] != b'Z'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0')))
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, s, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&mo) || !(1..=days_in_month(y, mo)).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None; // not a real date and time: `datetime.fromisoformat` refuses it too
    }
    Some(((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms)
}

thread_local! {
    /// The last day `put_time` wrote whose date took ten bytes (`YYYY-MM-DD`, a four-digit year),
    /// and those bytes: the times of a call and of an update mostly fall on one day.
    static LAST_DAY: std::cell::Cell<(i64, [u8; 10])> = const { std::cell::Cell::new((i64::MIN, [0; 10])) };
}

/// `rfc3339_ms`, quoted.
fn put_time(out: &mut Vec<u8>, epoch_ms: i64) {
    let (second, millis) = (epoch_ms.div_euclid(1000), epoch_ms.rem_euclid(1000));
    let (day, rest) = (second.div_euclid(86_400), second.rem_euclid(86_400));
    out.push(b'"');
    let (last, date) = LAST_DAY.with(std::cell::Cell::get);
    if last == day {
        out.extend_from_slice(&date);
    } else {
        let (y, m, d) = civil_from_days(day);
        let start = out.len();
        if (0..10_000).contains(&y) {
            put4(out, y);
        } else {
            put_int(out, y);
        }
        for (sep, value) in [(b'-', m), (b'-', d)] {
            out.push(sep);
            put2(out, value);
        }
        if let Ok(date) = <[u8; 10]>::try_from(&out[start..]) {
            LAST_DAY.with(|cell| cell.set((day, date)));
        }
    }
    for (sep, value) in [(b'T', rest / 3600), (b':', rest % 3600 / 60), (b':', rest % 60)] {
        out.push(sep);
        put2(out, value);
    }
    out.push(b'.');
    put3(out, millis);
    out.extend_from_slice(b"Z\"");
}

fn put_opt_time(out: &mut Vec<u8>, t: Option<i64>) {
    match t {
        Some(ms) => put_time(out, ms),
        None => out.extend_from_slice(b"null"),
    }
}

// -- the fold -------------------------------------------------------------------------------

/// The parts joined (a state key): one allocation, without `format!`'s machinery (a few per event).
fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// `_call_id`.
fn call_id(tenant: &str, dref: &str) -> String {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0x1f]);
    h.update(dref.as_bytes());
    let digest = h.finalize();
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

/// The fields of a notification the fold reads, borrowed from the value `decode` read or from
/// the `Notification`'s strings.
struct Note<'a> {
    event_id: &'a str,
    tenant: &'a str,
    kind: &'a str,
    account: &'a str,
    caller: &'a str,
    callee: &'a str,
    callref: Option<&'a str>,
    dref: &'a str,
    dref_replace: Option<&'a str>,
    session_id: Option<&'a str>,
    is_acd: bool,
    redirecting_number: Option<&'a str>,
    event_time: &'a str,
}

/// A `Notification`'s fields as Python strings (None where a field holds None), or None when one
/// is not a string or None, or `is_acd` not a bool.
fn fields_of<'py>(py: Python<'py>, n: &Bound<'py, PyAny>) -> Option<([Option<Bound<'py, PyString>>; 12], bool)> {
    // The fields the fold reads, in the order of `Note` and of `scan`'s f[0..12] (is_acd apart).
    let names = [intern!(py, "event_id"), intern!(py, "tenant"), intern!(py, "type"), intern!(py, "account"),
                 intern!(py, "caller"), intern!(py, "callee"), intern!(py, "callref"), intern!(py, "dref"),
                 intern!(py, "dref_replace"), intern!(py, "session_id"), intern!(py, "redirecting_number"),
                 intern!(py, "event_time")];
    let mut fields: [Option<Bound<'py, PyString>>; 12] = Default::default();
    for (slot, name) in fields.iter_mut().zip(names) {
        let value = n.getattr(name).ok()?;
        if !value.is_none() {
            *slot = Some(value.downcast_into::<PyString>().ok()?);
        }
    }
    let is_acd = n.getattr(intern!(py, "is_acd")).ok()?.downcast::<PyBool>().ok()?.is_true();
    Some((fields, is_acd))
}

/// The note of 12 optional texts in `fields_of`'s order; None without a DREF or when a field
/// that is never null is.
fn note_from<'a>(f: [Option<&'a str>; 12], is_acd: bool) -> Option<Note<'a>> {
    Some(Note {
        event_id: f[0]?,
        tenant: f[1]?,
        kind: f[2]?,
        account: f[3]?,
        caller: f[4]?,
        callee: f[5]?,
        callref: f[6],
        dref: f[7]?,
        dref_replace: f[8],
        session_id: f[9],
        is_acd,
        redirecting_number: f[10],
        event_time: f[11]?,
    })
}

/// A notification `Fold.decode` read from a value laid out as the edge writes it, without making
/// the Python `Notification` and its 16 strings: the value (kept by reference, bytes are
/// immutable), where each text field is in it, and what the runtime asks of every event (its
/// tenant, its event time). `notification()` makes the `Notification` Python would have made,
/// once, for the code that reads its attributes (the cases the fold leaves to Python).
#[pyclass(frozen, module = "processors._native")]
struct Event {
    value: Py<PyBytes>,
    /// Byte ranges in `value` of scan's texts, in its order (`f[0..14]`); None = null.
    spans: [Option<(usize, usize)>; 14],
    is_acd: bool,
    version: i64,
    /// The event time in ms since the epoch (what `parse_rfc3339_ms(event_time)` gives).
    #[pyo3(get)]
    event_ms: i64,
    /// The tenant (the record's key, and the time domain).
    #[pyo3(get)]
    tenant: Py<PyString>,
    /// The record's key, the tenant's bytes (the key of the call update).
    key: Py<PyBytes>,
    class: Py<PyAny>,
    made: pyo3::sync::GILOnceCell<Py<PyAny>>,
}

impl Event {
    /// The text fields, borrowed from the value (checked as UTF-8 by the scan already; checked again
    /// here rather than trusted, once for the whole value).
    fn texts<'a>(&self, raw: &'a [u8]) -> PyResult<[Option<&'a str>; 14]> {
        let whole = std::str::from_utf8(raw)?;
        let mut f: [Option<&str>; 14] = [None; 14];
        for (text, span) in f.iter_mut().zip(self.spans) {
            *text = match span {
                Some((start, end)) => Some(whole.get(start..end).ok_or_else(|| {
                    pyo3::exceptions::PyValueError::new_err("an event's field is not where it was")
                })?),
                None => None,
            };
        }
        Ok(f)
    }
}

#[pymethods]
impl Event {
    /// The `Notification` of this event (made on first use, then the same object).
    fn notification<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let made = self.made.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            let f = self.texts(self.value.as_bytes(py))?;
            let text = |s: Option<&str>| -> Bound<'py, PyAny> {
                match s {
                    Some(s) => PyString::new(py, s).into_any(),
                    None => py.None().into_bound(py),
                }
            };
            let mut args: Vec<Bound<'py, PyAny>> = f[..10].iter().map(|&s| text(s)).collect();
            args.push(PyBool::new(py, self.is_acd).to_owned().into_any());
            args.push(text(f[10]));
            args.push(self.version.into_pyobject(py)?.into_any());
            args.extend(f[11..].iter().map(|&s| text(s)));
            Ok(self.class.bind(py).call1(PyTuple::new(py, args)?)?.unbind())
        })?;
        Ok(made.bind(py).clone())
    }

    /// Any other attribute is the `Notification`'s (`event.caller`, `event.dref`, ...): code that
    /// reads a decoded notification's fields, a wrapper of `CallRecords` for one, reads them alike.
    fn __getattr__<'py>(&self, py: Python<'py>, name: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyAny>> {
        self.notification(py)?.getattr(name)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Event({})", self.notification(py)?.repr()?))
    }
}

fn is_22_digits(s: &str) -> bool {
    s.len() == 22 && s.bytes().all(|c| c.is_ascii_digit())
}

fn owned(text: Option<&str>) -> Val {
    text.map_or(Val::Null, |t| Val::Str(t.to_owned()))
}

/// `_fold`.
fn fold(call: &mut Call, n: &Note<'_>, event_ms: i64) {
    let index = match call.legs.iter().position(|l| l.dref() == n.dref) {
        Some(i) => i,
        None => {
            call.legs.push(Leg {
                slots: vec![
                    Val::Str(n.dref.to_owned()),
                    owned(n.callref),
                    Val::Str(n.account.to_owned()),
                    Val::Str(n.caller.to_owned()),
                    Val::Str(n.callee.to_owned()),
                    Val::Null,
                    Val::Null,
                    Val::Null,
                    owned(n.dref_replace),
                    owned(n.session_id),
                    Val::Bool(n.is_acd),
                    owned(n.redirecting_number),
                    Val::Int(event_ms),
                    Val::Bool(false),
                    Val::Bool(false),
                ],
            });
            call.legs.len() - 1
        }
    };
    let leg = &mut call.legs[index];
    match n.kind {
        "SETUP" => {
            leg.slots[CALLREF] = owned(n.callref);
            leg.slots[CALLER] = Val::Str(n.caller.to_owned());
            leg.slots[CALLEE] = Val::Str(n.callee.to_owned());
            if let Some(r) = n.dref_replace.filter(|r| !r.is_empty()) {
                leg.slots[REPLACES] = Val::Str(r.to_owned());
            }
            if leg.at(SETUP_AT).map_or(true, |at| event_ms < at) {
                leg.slots[SETUP_AT] = Val::Int(event_ms);
            }
        }
        "CONNECT" => {
            if leg.at(CONNECT_AT).map_or(true, |at| event_ms < at) {
                leg.slots[CONNECT_AT] = Val::Int(event_ms);
            }
            let answering = if n.callee != n.account { n.callee } else { "" };
            if is_22_digits(answering) {
                leg.slots[VOICEMAIL] = Val::Bool(true);
            }
        }
        _ => {
            if leg.at(RELEASE_AT).map_or(true, |at| event_ms > at) {
                leg.slots[RELEASE_AT] = Val::Int(event_ms);
            }
        }
    }
    if event_ms < leg.first_at() {
        leg.slots[FIRST_AT] = Val::Int(event_ms);
    }
    if !leg.slots[SESSION_ID].truthy() {
        leg.slots[SESSION_ID] = owned(n.session_id);
    }
    if !leg.slots[IS_ACD].truthy() {
        leg.slots[IS_ACD] = Val::Bool(n.is_acd);
    }
    if !leg.slots[REDIRECTING].truthy() {
        leg.slots[REDIRECTING] = owned(n.redirecting_number);
    }
    match call.last_event {
        Val::Int(last) if event_ms <= last => {}
        _ => call.last_event = Val::Int(event_ms),
    }
}

/// `_wake_at`.
fn wake_at(call: &Call, linger_ms: i64, ring_timeout_ms: i64, max_duration_ms: i64) -> i64 {
    let open: Vec<&Leg> = call.legs.iter().filter(|l| l.at(RELEASE_AT).is_none()).collect();
    if open.is_empty() {
        return call.legs.iter().filter_map(|l| l.at(RELEASE_AT)).max().unwrap_or(0) + linger_ms;
    }
    open.iter()
        .map(|l| match l.at(CONNECT_AT) {
            Some(at) => at + max_duration_ms,
            None => l.at(SETUP_AT).unwrap_or_else(|| l.first_at()) + ring_timeout_ms,
        })
        .max()
        .unwrap_or(0)
}

/// `_leg_out`, written.
fn put_leg(out: &mut Vec<u8>, leg: &Leg) {
    out.extend_from_slice(b"{\"dref\":");
    if leg.slots[APPROX].truthy() {
        out.extend_from_slice(b"null");
    } else {
        put_val(out, &leg.slots[DREF]);
    }
    for (name, slot) in [(&b",\"callref\":"[..], CALLREF), (b",\"account\":", ACCOUNT), (b",\"caller\":", CALLER),
                         (b",\"callee\":", CALLEE)] {
        out.extend_from_slice(name);
        put_val(out, &leg.slots[slot]);
    }
    out.extend_from_slice(b",\"setup_at\":");
    put_opt_time(out, leg.at(SETUP_AT));
    out.extend_from_slice(b",\"connect_at\":");
    put_opt_time(out, leg.at(CONNECT_AT));
    out.extend_from_slice(b",\"release_at\":");
    put_opt_time(out, leg.at(RELEASE_AT));
    out.extend_from_slice(b",\"replaces\":");
    put_val(out, &leg.slots[REPLACES]);
    out.push(b'}');
}

/// `_ordered_legs`: by SETUP time (or first event), then DREF.
fn ordered_legs(call: &Call) -> Vec<&Leg> {
    let mut legs: Vec<&Leg> = call.legs.iter().collect();
    if legs.len() > 1 {
        legs.sort_by_key(|l| (l.at(SETUP_AT).unwrap_or_else(|| l.first_at()), l.dref()));
    }
    legs
}

/// `_update`'s value.
fn update(call: &Call, id: &str, tenant: &str, schema: &str, event_id: &str, event_ms: i64) -> Vec<u8> {
    let legs = ordered_legs(call);
    let first = legs[0];
    let (state, is_acd, session_id);
    if legs.len() == 1 {
        state = if first.at(RELEASE_AT).is_some() {
            "ended"
        } else if first.at(CONNECT_AT).is_some() {
            "answered"
        } else {
            "ringing"
        };
        is_acd = first.slots[IS_ACD].clone();
        session_id = if first.slots[SESSION_ID].truthy() { first.slots[SESSION_ID].clone() } else { Val::Null };
    } else {
        state = if legs.iter().all(|l| l.at(RELEASE_AT).is_some()) {
            "ended"
        } else if legs.iter().any(|l| l.at(CONNECT_AT).is_some()) {
            "answered"
        } else {
            "ringing"
        };
        is_acd = Val::Bool(legs.iter().any(|l| l.slots[IS_ACD].truthy()));
        session_id = legs.iter().map(|l| &l.slots[SESSION_ID]).find(|s| s.truthy()).cloned().unwrap_or(Val::Null);
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"{\"schema\":");
    put_str(&mut out, schema);
    out.extend_from_slice(b",\"call_id\":");
    put_str(&mut out, id);
    out.extend_from_slice(b",\"tenant\":");
    put_str(&mut out, tenant);
    out.extend_from_slice(b",\"state\":");
    put_str(&mut out, state);
    out.extend_from_slice(b",\"caller\":");
    put_val(&mut out, &first.slots[CALLER]);
    out.extend_from_slice(b",\"callee\":");
    put_val(&mut out, &first.slots[CALLEE]);
    out.extend_from_slice(b",\"is_acd\":");
    put_val(&mut out, &is_acd);
    out.extend_from_slice(b",\"session_id\":");
    put_val(&mut out, &session_id);
    out.extend_from_slice(b",\"updated_at\":");
    put_time(&mut out, event_ms);
    out.extend_from_slice(b",\"event_id\":");
    put_str(&mut out, event_id);
    out.extend_from_slice(b",\"legs\":");
    put_list(&mut out, legs, put_leg);
    out.push(b'}');
    out
}

/// The store as `Store.native_handles()` exposes it for one call: reads and staged writes exactly
/// as `Store.get`, `Store.put` and `Store.wake` do them, without a Python call each.
pub(crate) struct StoreView<'py> {
    py: Python<'py>,
    staged: Bound<'py, PyDict>,
    data: Bound<'py, PyDict>,
    missing: Bound<'py, PyAny>,
    undo: Option<Bound<'py, PyList>>,
    /// The current domain (`Store.domain`): its timers' keys are `WAKE + domain + SEP + key`.
    domain: Bound<'py, PyString>,
}

impl<'py> StoreView<'py> {
    pub(crate) fn of(store: &Bound<'py, PyAny>) -> PyResult<StoreView<'py>> {
        let py = store.py();
        let handles = store.call_method0(intern!(py, "native_handles"))?;
        let (staged, data, missing, undo, domain): (Bound<PyDict>, Bound<PyDict>, Bound<PyAny>,
                                                    Option<Bound<PyList>>, Bound<PyString>) = handles.extract()?;
        Ok(StoreView { py, staged, data, missing, undo, domain })
    }

    /// `Store.get`: the stored `bytes` object itself.
    pub(crate) fn get_bytes(&self, key: &str) -> PyResult<Option<Bound<'py, PyBytes>>> {
        self.get_bytes_at(&PyString::new(self.py, key))
    }

    /// `get_bytes` of a key made already (Python keeps a string's hash in it).
    fn get_bytes_at(&self, key: &Bound<'py, PyString>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let value = match self.staged.get_item(key)? {
            Some(value) => value,
            None => match self.data.get_item(key)? {
                Some(value) => value,
                None => return Ok(None),
            },
        };
        if value.is_none() {
            return Ok(None);
        }
        Ok(Some(value.downcast_into::<PyBytes>()?))
    }

    /// `Store.get`.
    pub(crate) fn get(&self, key: &str) -> PyResult<Option<Vec<u8>>> {
        Ok(self.get_bytes(key)?.map(|value| value.as_bytes().to_vec()))
    }

    /// `Store._stage`: a write, or a deletion (None), recorded in the step's undo log. What
    /// `put` and `delete` do for a processor's key (none of the fold's starts with a NUL), and
    /// `wake` once it found the timer changed.
    pub(crate) fn stage(&self, key: &str, value: Option<&[u8]>) -> PyResult<()> {
        debug_assert!(!key.starts_with('\0')
            || key.strip_prefix(store::WAKE).zip(self.domain.to_str().ok()).is_some_and(|(rest, domain)| {
                rest.strip_prefix(domain).is_some_and(|rest| rest.starts_with(store::SEP))
            }));
        let key = PyString::new(self.py, key);
        match value {
            Some(value) => self.stage_bytes(&key, &PyBytes::new(self.py, value).into_any()),
            None => self.stage_bytes(&key, &self.py.None().into_bound(self.py)),
        }
    }

    /// `stage` of a key and a value made already (so that the caller keeps the very object stored).
    fn stage_bytes(&self, key: &Bound<'py, PyString>, value: &Bound<'py, PyAny>) -> PyResult<()> {
        if let Some(undo) = &self.undo {
            let previous = self.staged.get_item(key)?.unwrap_or_else(|| self.missing.clone());
            undo.append((key, previous))?;
        }
        self.staged.set_item(key, value)
    }

    /// `Store.wake`.
    pub(crate) fn wake(&self, key: &str, at_ms: i64) -> PyResult<()> {
        let wake_key = PyString::new(self.py, &concat(&[store::WAKE, self.domain.to_str()?, store::SEP, key]));
        let mut value = Vec::with_capacity(16);
        put_int(&mut value, at_ms);
        if self.get_bytes_at(&wake_key)?.as_ref().map(|v| v.as_bytes()) != Some(value.as_slice()) {
            self.stage_bytes(&wake_key, &PyBytes::new(self.py, &value).into_any())?;
        }
        Ok(())
    }
}

// -- closing --------------------------------------------------------------------------------

/// `_secs`: seconds between two times, as orjson writes Python's `round(ms / 1000, 3)`; None
/// when the value is too large to be sure of the same digits (Python then renders the record).
fn put_secs(out: &mut Vec<u8>, start: Option<i64>, end: Option<i64>) -> Option<()> {
    let ms = match (start, end) {
        (Some(s), Some(e)) => e.checked_sub(s)?.max(0),
        _ => 0,
    };
    put_ms_as_seconds(out, ms)
}

/// `ms / 1000` of an int of milliseconds from 0 to 10^12 (the decimal, as Python's repr writes it).
fn put_ms_as_seconds(out: &mut Vec<u8>, ms: i64) -> Option<()> {
    if !(0..1_000_000_000_000).contains(&ms) {
        return None;
    }
    put_int(out, ms / 1000);
    out.push(b'.');
    let frac = ms % 1000;
    if frac == 0 {
        out.push(b'0');
    } else {
        put3(out, frac);
        while out.last() == Some(&b'0') {
            out.pop(); // trailing zeros, as Python's repr leaves none (a non-zero digit stays)
        }
    }
    Some(())
}

fn is_str(v: &Val) -> bool {
    matches!(v, Val::Str(_))
}

/// `CallRecords.record` of a closed call, written; None for values it does not expect.
fn record(call: &Call, id: &str, tenant: &str, schema: &str, closed_by: &str) -> Option<Vec<u8>> {
    let legs = ordered_legs(call);
    if legs.is_empty() || !legs.iter().all(|l| is_str(&l.slots[ACCOUNT])) {
        return None;
    }
    let first = legs[0];
    let (caller, callee, account) = (&first.slots[CALLER], &first.slots[CALLEE], &first.slots[ACCOUNT]);
    if !is_str(caller) || !is_str(callee) {
        return None;
    }
    let started = legs.iter().filter_map(|l| l.at(SETUP_AT)).min()
        .unwrap_or_else(|| legs.iter().map(|l| l.first_at()).min().unwrap_or(0));
    let mut connected: Vec<&Leg> = legs.iter().copied().filter(|l| l.at(CONNECT_AT).is_some()).collect();
    connected.sort_by(|a, b| a.at(CONNECT_AT).cmp(&b.at(CONNECT_AT)).then_with(|| a.dref().cmp(b.dref())));
    let answered = connected.first().and_then(|l| l.at(CONNECT_AT));
    let last_release = legs.iter().filter_map(|l| l.at(RELEASE_AT)).max();
    let last_event = match call.last_event {
        Val::Int(t) => Some(t),
        _ => None,
    };
    let ended = if closed_by == "release" || last_release.is_none() {
        last_release.or(last_event)
    } else {
        last_event
    };
    let is_acd = legs.iter().any(|l| l.slots[IS_ACD].truthy());
    let in_accounts = |v: &Val| legs.iter().any(|l| &l.slots[ACCOUNT] == v);
    let direction = if in_accounts(caller) && in_accounts(callee) {
        "internal"
    } else if caller == account && callee != account {
        "outbound"
    } else {
        "inbound"
    };
    let voicemail = connected.first().is_some_and(|l| l.slots[VOICEMAIL].truthy());
    let outcome = if !connected.is_empty() {
        if voicemail { "voicemail" } else { "answered" }
    } else if is_acd {
        "abandoned"
    } else if direction == "outbound" {
        "no_answer"
    } else {
        "missed"
    };
    let first_truthy = |slot: usize| legs.iter().map(|l| &l.slots[slot]).find(|v| v.truthy()).cloned();
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"{\"schema\":");
    put_str(&mut out, schema);
    out.extend_from_slice(b",\"record_id\":");
    put_str(&mut out, id);
    out.extend_from_slice(b",\"tenant\":");
    put_str(&mut out, tenant);
    out.extend_from_slice(b",\"revision\":");
    put_val(&mut out, &call.revision);
    out.extend_from_slice(b",\"direction\":");
    put_str(&mut out, direction);
    out.extend_from_slice(b",\"outcome\":");
    put_str(&mut out, outcome);
    out.extend_from_slice(b",\"caller\":");
    put_val(&mut out, caller);
    out.extend_from_slice(b",\"callee\":");
    put_val(&mut out, callee);
    out.extend_from_slice(b",\"answered_by\":");
    match connected.first() {
        Some(l) if !voicemail => put_val(&mut out, &l.slots[ACCOUNT]),
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"started_at\":");
    put_time(&mut out, started);
    out.extend_from_slice(b",\"answered_at\":");
    put_opt_time(&mut out, answered);
    out.extend_from_slice(b",\"ended_at\":");
    put_opt_time(&mut out, ended);
    out.extend_from_slice(b",\"wait_seconds\":");
    put_secs(&mut out, Some(started), answered.or(ended))?;
    out.extend_from_slice(b",\"talk_seconds\":");
    match answered {
        Some(_) => put_secs(&mut out, answered, ended)?,
        None => out.extend_from_slice(b"0.0"),
    }
    out.extend_from_slice(b",\"duration_seconds\":");
    put_secs(&mut out, Some(started), ended)?;
    out.extend_from_slice(if is_acd { b",\"is_acd\":true" } else { b",\"is_acd\":false" });
    out.extend_from_slice(b",\"session_id\":");
    put_val(&mut out, &first_truthy(SESSION_ID).unwrap_or(Val::Null));
    out.extend_from_slice(if first_truthy(REPLACES).is_some() { b",\"transferred\":true" }
                          else { b",\"transferred\":false" });
    out.extend_from_slice(b",\"redirecting_number\":");
    put_val(&mut out, &first_truthy(REDIRECTING).unwrap_or(Val::Null));
    out.extend_from_slice(b",\"legs\":");
    put_list(&mut out, legs.iter().copied(), put_leg);
    out.extend_from_slice(b",\"closed_by\":");
    put_str(&mut out, closed_by);
    out.extend_from_slice(if legs.iter().any(|l| l.slots[APPROX].truthy()) {
        b",\"correlation\":\"approximate\"}"
    } else {
        b",\"correlation\":\"exact\"}"
    });
    Some(out)
}

/// `CallRecords._index_keys`; None when an identifier is not a string (Python formats those).
fn index_keys(call: &Call, tenant: &str) -> Option<Vec<String>> {
    let mut keys = Vec::with_capacity(call.legs.len() * 2);
    for leg in &call.legs {
        keys.push(concat(&["i/", tenant, "/d/", leg.dref()]));
        for (slot, kind) in [(REPLACES, "d"), (SESSION_ID, "s"), (CALLREF, "c")] {
            match &leg.slots[slot] {
                Val::Str(s) if !s.is_empty() => keys.push(concat(&["i/", tenant, "/", kind, "/", s])),
                v if v.truthy() => return None,
                _ => {}
            }
        }
    }
    Some(keys)
}

// -- decoding ---------------------------------------------------------------------------------

/// Reads a notification laid out as the edge writes it, field by field, accepting exactly what
/// `schemas.notification._canonical_layout()` accepts (or less: anything else goes to Python).
struct Scanner<'a> {
    /// The value, checked as UTF-8 once (its texts are then slices of it).
    text: &'a str,
    b: &'a [u8],
    at: usize,
}

fn is_ident(c: u8) -> bool {
    (0x21..=0x7e).contains(&c) && c != b'"' && c != b'\\'
}

impl<'a> Scanner<'a> {
    fn lit(&mut self, text: &[u8]) -> Option<()> {
        if self.b.get(self.at..self.at + text.len())? == text {
            self.at += text.len();
            Some(())
        } else {
            None
        }
    }

    /// A quoted string of bytes accepted by `ok`, `min..=max` of them; its text.
    fn quoted(&mut self, min: usize, max: usize, ok: impl Fn(u8) -> bool) -> Option<&'a str> {
        self.lit(b"\"")?;
        let start = self.at;
        while self.at < self.b.len() && self.b[self.at] != b'"' {
            if !ok(self.b[self.at]) {
                return None;
            }
            self.at += 1;
        }
        let len = self.at - start;
        self.lit(b"\"")?;
        if len < min || len > max {
            return None;
        }
        self.text.get(start..start + len)
    }

    fn nullable(&mut self, max: usize, ok: impl Fn(u8) -> bool) -> Option<Option<&'a str>> {
        if self.lit(b"null").is_some() {
            return Some(None);
        }
        self.quoted(1, max, ok).map(Some)
    }
}

/// `\+?[0-9]+` (its length bounded by the caller).
fn is_number(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
}

/// The contract's `_TIMESTAMP` (years 1970-2199) holding a real date and time: what Python's check
/// of the event time accepts (for the reception time, less than its pattern: the rest goes to Python).
fn timestamp_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let years = (b[0] == b'1' && b[1] == b'9' && (b'7'..=b'9').contains(&b[2]))
        || (b[0] == b'2' && (b[1] == b'0' || b[1] == b'1') && b[2].is_ascii_digit());
    if years && b[3].is_ascii_digit() { parse_time(s) } else { None }
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The fields of a canonical notification, in the dataclass's order; None for any other value.
fn scan(raw: &[u8]) -> Option<(Vec<Option<&str>>, bool, i64, i64)> {
    let mut sc = Scanner { text: std::str::from_utf8(raw).ok()?, b: raw, at: 0 };
    let number64 = |c: u8| c == b'+' || c.is_ascii_digit();
    let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    let mut f: Vec<Option<&str>> = Vec::with_capacity(16);
    sc.lit(b"{\"event_id\":")?;
    f.push(Some(sc.quoted(32, 32, hex)?));
    sc.lit(b",\"tenant\":")?;
    let tenant = sc.quoted(1, 64, |c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')?;
    if !tenant.as_bytes()[0].is_ascii_alphanumeric() {
        return None;
    }
    f.push(Some(tenant));
    sc.lit(b",\"type\":")?;
    let kind = sc.quoted(5, 7, |c| c.is_ascii_uppercase())?;
    if !matches!(kind, "SETUP" | "CONNECT" | "RELEASE") {
        return None;
    }
    f.push(Some(kind));
    sc.lit(b",\"account\":")?;
    let account = sc.quoted(1, 64, number64)?;
    if !is_number(account) {
        return None;
    }
    f.push(Some(account));
    for name in [&b",\"caller\":"[..], b",\"callee\":"] {
        sc.lit(name)?;
        let party = sc.quoted(0, 64, |c| number64(c) || c.is_ascii_lowercase())?;
        if !(party.is_empty() || party == "anonymous" || is_number(party)) {
            return None;
        }
        f.push(Some(party));
    }
    for (name, max) in [(&b",\"callref\":"[..], 64), (b",\"dref\":", 32), (b",\"dref_replace\":", 32),
                        (b",\"session_id\":", 40)] {
        sc.lit(name)?;
        f.push(sc.nullable(max, is_ident)?);
    }
    sc.lit(b",\"is_acd\":")?;
    let is_acd = if sc.lit(b"true").is_some() {
        true
    } else {
        sc.lit(b"false")?;
        false
    };
    sc.lit(b",\"redirecting_number\":")?;
    let redirecting = sc.nullable(64, number64)?;
    if redirecting.is_some_and(|r| !is_number(r)) {
        return None;
    }
    f.push(redirecting);
    sc.lit(b",\"version\":")?;
    let start = sc.at;
    while sc.at < raw.len() && raw[sc.at].is_ascii_digit() && sc.at - start < 5 {
        sc.at += 1;
    }
    let digits = &raw[start..sc.at];
    if digits.is_empty() || digits.len() > 4 || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    let version = digits.iter().fold(0i64, |acc, &c| acc * 10 + i64::from(c - b'0'));
    sc.lit(b",\"event_time\":")?;
    let event_time = sc.quoted(24, 24, |c| c.is_ascii_alphanumeric() || b"-:.".contains(&c))?;
    sc.lit(b",\"received_at\":")?;
    let received_at = sc.quoted(24, 24, |c| c.is_ascii_alphanumeric() || b"-:.".contains(&c))?;
    let event_ms = timestamp_ms(event_time)?;
    timestamp_ms(received_at)?;
    f.push(Some(event_time));
    f.push(Some(received_at));
    sc.lit(b",\"source_ip\":")?;
    f.push(Some(sc.quoted(1, 64, |c| (0x20..=0x7e).contains(&c) && c != b'"' && c != b'\\')?));
    sc.lit(b",\"schema\":\"keyyo.notification.v1\"}")?;
    (sc.at == raw.len()).then_some((f, is_acd, version, event_ms))
}

/// Settings and Python objects the fold needs, made once per `CallRecords`.
#[pyclass(frozen)]
struct Fold {
    linger_ms: i64,
    ring_timeout_ms: i64,
    max_duration_ms: i64,
    max_legs: usize,
    max_events: usize,
    retention_ms: i64,
    updates_topic: String,
    update_schema: String,
    records_topic: String,
    record_schema: String,
    output: Py<PyAny>,
    notification: Py<PyAny>,
    decoded: Mutex<HashMap<String, Decoded>>,
    decoded_calls: usize,
    /// The tenants' strings, made once each (at most `TENANTS_KEPT`, then made again).
    tenants: Mutex<HashMap<Vec<u8>, Py<PyString>>>,
}

/// Tenants whose string a fold keeps (an operator has tens to thousands).
const TENANTS_KEPT: usize = 4096;

/// A call this fold wrote, kept decoded with the `bytes` object it staged for it. While a call's
/// key still holds that very object (bytes are immutable, and the reference kept here keeps its
/// identity from being reused), the call is this one, and its next event or timer need not read
/// the value again. Anything else (a rolled-back step, an aborted transaction, Python's own
/// writes, a restore) leaves another object there, and the value is read as usual.
struct Decoded {
    value: Py<PyBytes>,
    call: Call,
}

impl Fold {
    fn decoded(&self) -> MutexGuard<'_, HashMap<String, Decoded>> {
        self.decoded.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The call of `raw`, the value stored at `key`: the decoded call when `raw` is the object
    /// this fold wrote there (taken out; `keep` or `save` puts it back), else `unpack`.
    fn load(&self, key: &str, raw: &Bound<'_, PyBytes>) -> Option<Call> {
        match self.decoded().remove(key) {
            Some(kept) if kept.value.as_ptr() == raw.as_ptr() => Some(kept.call),
            _ => unpack(raw.as_bytes()),
        }
    }

    /// Keep `call` decoded as the call of `value`, the object stored at `key`.
    fn keep(&self, key: &str, value: Bound<'_, PyBytes>, call: Call) {
        let mut decoded = self.decoded();
        if decoded.len() >= self.decoded_calls {
            decoded.clear();
            if self.decoded_calls == 0 {
                return;
            }
        }
        decoded.insert(key.to_owned(), Decoded { value: value.unbind(), call });
    }

    /// `_save`: stage the call's value at `key`, and keep it decoded.
    fn save(&self, view: &StoreView<'_>, key: &Bound<'_, PyString>, call: Call) -> PyResult<()> {
        let value = PyBytes::new(view.py, &pack(&call));
        view.stage_bytes(key, &value)?;
        self.keep(key.to_str()?, value, call);
        Ok(())
    }
}

#[pymethods]
impl Fold {
    /// `decoded_calls`: at most this many calls are kept decoded between their events (≈ 1 KB
    /// each); past it, all are dropped and the next events read their values again.
    #[new]
    #[pyo3(signature = (linger_ms, ring_timeout_ms, max_duration_ms, retention_ms, max_legs, max_events,
                        updates_topic, update_schema, records_topic, record_schema, output, notification,
                        decoded_calls = 16_384))]
    #[allow(clippy::too_many_arguments)]
    fn new(linger_ms: i64, ring_timeout_ms: i64, max_duration_ms: i64, retention_ms: i64, max_legs: usize,
           max_events: usize, updates_topic: String, update_schema: String, records_topic: String,
           record_schema: String, output: Py<PyAny>, notification: Py<PyAny>, decoded_calls: usize) -> Fold {
        Fold { linger_ms, ring_timeout_ms, max_duration_ms, retention_ms, max_legs, max_events, updates_topic,
               update_schema, records_topic, record_schema, output, notification,
               decoded: Mutex::new(HashMap::new()), decoded_calls, tenants: Mutex::new(HashMap::new()) }
    }

    /// How many calls are kept decoded now (for tests and benchmarks).
    fn kept(&self) -> usize {
        self.decoded().len()
    }

    /// `CallRecords.on_timer(store, key, now_ms)` for a call's timer; None for the others, and
    /// for a call whose values it does not expect.
    fn on_timer<'py>(&self, py: Python<'py>, store: &Bound<'py, PyAny>, key: &str, now_ms: i64)
                     -> PyResult<Option<Bound<'py, PyList>>> {
        let Some(rest) = key.strip_prefix("c/") else { return Ok(None) };
        let Some((tenant, id)) = rest.split_once('/') else { return Ok(None) };
        let view = StoreView::of(store)?;
        let Some(raw) = view.get_bytes(key)? else { return Ok(Some(PyList::empty(py))) };
        let Some(mut call) = self.load(key, &raw) else { return Ok(None) };
        if call.closed.truthy() {
            let Val::Int(closed_at) = call.closed_at else { return Ok(None) };
            if now_ms >= closed_at + self.retention_ms {
                let Some(keys) = index_keys(&call, tenant) else { return Ok(None) };
                for index in keys {
                    if view.get(&index)?.as_deref() == Some(id.as_bytes()) {
                        view.stage(&index, None)?;
                    }
                }
                view.stage(key, None)?;
            } else {
                view.wake(key, closed_at + self.retention_ms)?;
                self.keep(key, raw, call);
            }
            return Ok(Some(PyList::empty(py)));
        }
        let Val::Int(revision) = call.revision else { return Ok(None) };
        let wake = wake_at(&call, self.linger_ms, self.ring_timeout_ms, self.max_duration_ms);
        if call.legs.is_empty() {
            return Ok(None);
        }
        if now_ms < wake {
            view.wake(key, wake)?;
            self.keep(key, raw, call);
            return Ok(Some(PyList::empty(py)));
        }
        let closing = if call.legs.iter().any(|l| l.at(RELEASE_AT).is_none()) { "timeout" } else { "release" };
        call.closed = Val::Bool(true);
        call.closed_by = Val::Str(closing.to_owned());
        call.closed_at = Val::Int(now_ms);
        call.revision = Val::Int(revision + 1);
        let Some(value) = record(&call, id, tenant, &self.record_schema, closing) else { return Ok(None) };
        self.save(&view, &PyString::new(py, key), call)?;
        view.wake(key, now_ms + self.retention_ms)?;
        let output = self.output.bind(py).call1((
            &self.records_topic,
            PyBytes::new(py, tenant.as_bytes()),
            PyBytes::new(py, &value),
        ))?;
        Ok(Some(PyList::new(py, [output])?))
    }

    /// `CallRecords.decode(key, value)` of a value laid out as the edge writes it and keyed by its
    /// tenant: an `Event` (whose `notification()` is the `Notification` Python would make of it);
    /// None for anything else.
    fn decode<'py>(&self, py: Python<'py>, record_key: &Bound<'py, PyBytes>, value: &Bound<'py, PyBytes>)
                   -> PyResult<Option<Event>> {
        let (key, raw) = (record_key.as_bytes(), value.as_bytes());
        let Some((f, is_acd, version, event_ms)) = scan(raw) else { return Ok(None) };
        if f[1].map(str::as_bytes) != Some(key) {
            return Ok(None);
        }
        // The scan's texts are slices of the value (it takes no escapes): where each one is.
        let base = raw.as_ptr() as usize;
        let mut spans = [None; 14];
        for (span, text) in spans.iter_mut().zip(&f) {
            *span = text.map(|t| (t.as_ptr() as usize - base, t.as_ptr() as usize - base + t.len()));
        }
        let tenant = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match tenants.get(key) {
                Some(tenant) => tenant.clone_ref(py),
                None => {
                    if tenants.len() >= TENANTS_KEPT {
                        tenants.clear();
                    }
                    let tenant = PyString::new(py, f[1].unwrap_or_default()).unbind();
                    tenants.insert(key.to_vec(), tenant.clone_ref(py));
                    tenant
                }
            }
        };
        Ok(Some(Event { value: value.clone().unbind(), spans, is_acd, version, event_ms, tenant,
                        key: record_key.clone().unbind(),
                        class: self.notification.clone_ref(py), made: pyo3::sync::GILOnceCell::new() }))
    }

    /// `CallRecords.on_event(store, n, now_ms)` for the common case; None for the others.
    fn on_event<'py>(&self, py: Python<'py>, store: &Bound<'py, PyAny>, n: &Bound<'py, PyAny>)
                     -> PyResult<Option<Bound<'py, PyList>>> {
        // An event `decode` made (the runtime's case) is read from the value it was made of; a
        // `Notification`, from its attributes. Neither is changed once made.
        let (attributes, texts);
        let mut record_key = None; // the update's key, when the event has it already
        let mut known_ms = None; // the event time, likewise
        let note = match n.downcast::<Event>() {
            Ok(event) => {
                let event = event.get();
                record_key = Some(event.key.bind(py).clone());
                known_ms = Some(event.event_ms);
                texts = event.texts(event.value.as_bytes(py))?;
                let mut f: [Option<&str>; 12] = [None; 12];
                f.copy_from_slice(&texts[..12]);
                note_from(f, event.is_acd)
            }
            Err(_) => {
                attributes = fields_of(py, n);
                match &attributes {
                    Some((fields, is_acd)) => {
                        let mut f: [Option<&str>; 12] = [None; 12];
                        for (text, field) in f.iter_mut().zip(fields) {
                            *text = match field {
                                Some(field) => Some(field.to_str()?),
                                None => None,
                            };
                        }
                        note_from(f, *is_acd)
                    }
                    None => None,
                }
            }
        };
        let Some(note) = note else { return Ok(None) }; // no DREF, or not a plain notification
        let Some(event_ms) = known_ms.or_else(|| parse_time(note.event_time)) else { return Ok(None) };
        let t = note.tenant;
        let own_id = call_id(t, note.dref);
        let mut index_keys = Vec::with_capacity(4);
        index_keys.push(concat(&["i/", t, "/d/", note.dref]));
        if let Some(r) = note.dref_replace.filter(|r| !r.is_empty()) {
            index_keys.push(concat(&["i/", t, "/d/", r]));
        }
        if let Some(s) = note.session_id.filter(|s| !s.is_empty()) {
            index_keys.push(concat(&["i/", t, "/s/", s]));
        }
        if let Some(c) = note.callref.filter(|c| !c.is_empty()) {
            index_keys.push(concat(&["i/", t, "/c/", c]));
        }
        let view = StoreView::of(store)?;
        let get = |key: &str| view.get(key);
        // A call's state, with the Python key it was looked up with (used again to stage it).
        let state_of = |id: &str| -> PyResult<(Bound<'py, PyString>, Option<Bound<'py, PyBytes>>)> {
            let key = PyString::new(py, &concat(&["c/", t, "/", id]));
            let state = view.get_bytes_at(&key)?;
            Ok((key, state))
        };
        // Which call each index key leads to, and each call's state once read (in first-seen order).
        let mut pointed: Vec<Option<String>> = vec![None; index_keys.len()];
        let mut found: Vec<(String, Option<(Bound<'py, PyString>, Bound<'py, PyBytes>)>)> = Vec::new();
        let mut own_key: Option<Bound<'py, PyString>> = None; // the own call's key, looked up and empty
        for (i, key) in index_keys.iter().enumerate() {
            if let Some(raw) = get(key)? {
                let Ok(id) = String::from_utf8(raw) else { return Ok(None) };
                if !found.iter().any(|(f, _)| *f == id) {
                    found.push((id.clone(), None));
                }
                pointed[i] = Some(id);
            } else if key.as_bytes()[t.len() + 3] == b'd' {
                let id = if i == 0 { own_id.clone() } else { call_id(t, &key[t.len() + 5..]) };
                let known = found.iter().position(|(f, _)| *f == id);
                let state = match known.and_then(|k| found[k].1.clone()) {
                    Some(state) => Some(state),
                    None => match state_of(&id)? {
                        (key, Some(state)) => Some((key, state)),
                        (key, None) => {
                            if id == own_id {
                                own_key = Some(key);
                            }
                            None
                        }
                    },
                };
                if let Some(state) = state {
                    match known {
                        Some(k) => found[k].1 = Some(state),
                        None => found.push((id.clone(), Some(state))),
                    }
                    pointed[i] = Some(id);
                }
            }
        }
        let mut calls: Vec<(String, Bound<'py, PyString>, Bound<'py, PyBytes>)> = Vec::new();
        for (id, state) in found {
            let state = match state {
                Some(state) => Some(state),
                None => match state_of(&id)? {
                    (key, Some(state)) => Some((key, state)),
                    (_, None) => None,
                },
            };
            if let Some((key, state)) = state {
                calls.push((id, key, state));
            }
        }
        if calls.len() > 1 {
            return Ok(None); // calls to merge
        }
        let (id, call_key, mut call) = match calls.pop() {
            None if self.max_legs >= 1 => {
                let key = match own_key {
                    Some(key) => key,
                    None => PyString::new(py, &concat(&["c/", t, "/", &own_id])),
                };
                (own_id.clone(), key, Call::new())
            }
            None => return Ok(None),
            Some((id, key, raw)) => match self.load(key.to_str()?, &raw) {
                Some(call) if call.legs.len() < self.max_legs => (id, key, call),
                _ => return Ok(None), // another form, or at its bound: Python says why
            },
        };
        // The event id's first 12 characters, borrowed (not collected a character at a time).
        let short = match note.event_id.char_indices().nth(12) {
            Some((end, _)) => &note.event_id[..end],
            None => note.event_id,
        };
        if call.events.iter().any(|seen| seen == short) {
            return Ok(Some(PyList::empty(py))); // an exact duplicate
        }
        if call.events.len() >= self.max_events {
            return Ok(None);
        }
        call.events.push(short.to_owned());
        fold(&mut call, &note, event_ms);
        call.closed = Val::Bool(false);
        for (i, key) in index_keys.iter().enumerate() {
            if pointed[i].as_deref() != Some(id.as_str()) && !(i == 0 && own_id == id) {
                view.stage(key, Some(id.as_bytes()))?;
            }
        }
        let wake = wake_at(&call, self.linger_ms, self.ring_timeout_ms, self.max_duration_ms);
        let value = update(&call, &id, t, &self.update_schema, note.event_id, event_ms);
        self.save(&view, &call_key, call)?;
        view.wake(call_key.to_str()?, wake)?;
        let output = self.output.bind(py).call1((
            &self.updates_topic,
            record_key.unwrap_or_else(|| PyBytes::new(py, t.as_bytes())),
            PyBytes::new(py, &value),
        ))?;
        Ok(Some(PyList::new(py, [output])?))
    }
}

/// The digest of the crate's sources this build was made from, as `deploy/compiled.py` computes
/// it and passes it to cargo. Cargo rebuilds the crate when it changes, so a build folder shared
/// by several trees never hands one tree the extension built from another's sources; the build
/// then finds this very text in the extension it copies.
const SOURCES: &str = match option_env!("KEYYO_NATIVE_SOURCES") {
    Some(digest) => digest,
    None => "",
};

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SOURCES", SOURCES)?;
    m.add_class::<Fold>()?;
    m.add_class::<Event>()?;
    m.add_class::<acd::Figures>()?;
    m.add_class::<batch::RecordBatch>()?;
    m.add_function(wrap_pyfunction!(batch::crc32c_of, m)?)?;
    m.add_function(wrap_pyfunction!(json_str, m)?)?;
    m.add_function(wrap_pyfunction!(batch::add_outputs, m)?)?;
    m.add_function(wrap_pyfunction!(store::apply_entries, m)?)?;
    m.add_function(wrap_pyfunction!(acd::decode_call_record, m)?)?;
    m.add_function(wrap_pyfunction!(acd::count_call, m)?)
}
