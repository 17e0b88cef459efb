//! acd-stats in Rust (processors/acd_stats.py), two parts:
//!
//! - `decode_call_record` is `decode_record`: the `AcdCall` of a call record, for the values it can
//!   read with certainty; `None` for any other, which Python then decodes (and, if the record is
//!   broken, explains). What it accepts, Python accepts and reads the same way.
//! - `Figures.render` writes an interval's `keyyo.acd-stats.v1` value with the bytes orjson writes
//!   for `AcdStatsLogic.figures`; `None` for a state it does not expect, which Python renders.
//!
//! tests/unit/test_native.py compares both with Python on simulated records, on thousands of their
//! clumsy or hostile neighbours, and on intervals of every kind.
//!
//! The JSON reader below is deliberately narrower than JSON: strings without escapes or control
//! characters, numbers that orjson reads exactly as Rust does, at most 32 levels. A value outside
//! that goes to Python, which reads full JSON with orjson. The fold of call records (lib.rs) reads
//! its calls' state with it too.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};
use pyo3::IntoPyObjectExt;
use std::io::Write;

use crate::{parse_time, put_int, put_ms_as_seconds, put_str, put_time};

/// A JSON value borrowed from the record (an object keeps its members in order; as orjson, the
/// last of two members with the same name wins).
pub(crate) enum J<'a> {
    Null,
    Bool(bool),
    /// An integer written without fraction or exponent, of at most 18 digits (an `int` for orjson).
    Int(i64),
    /// Any other number, finite (a `float` for orjson).
    Float(f64),
    Str(&'a str),
    /// A string with escapes, decoded (only from `read_escaped`).
    Text(String),
    Arr(Vec<J<'a>>),
    Obj(Vec<(&'a str, J<'a>)>),
}

impl<'a> J<'a> {
    /// `dict.get(name)`: None when absent or not an object.
    fn get(&self, name: &str) -> Option<&J<'a>> {
        match self {
            J::Obj(members) => members.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| v),
            _ => None,
        }
    }
}

struct Reader<'a> {
    s: &'a str,
    b: &'a [u8],
    at: usize,
    depth: usize,
    /// Whether a string value may hold the escapes orjson writes (see `escaped`).
    escapes: bool,
}

impl<'a> Reader<'a> {
    fn space(&mut self) {
        while self.at < self.b.len() && matches!(self.b[self.at], b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }

    fn byte(&mut self) -> Option<u8> {
        self.space();
        let c = *self.b.get(self.at)?;
        self.at += 1;
        Some(c)
    }

    fn value(&mut self) -> Option<J<'a>> {
        match self.byte()? {
            b'{' => self.nested(|r| {
                let mut members = Vec::with_capacity(24);
                if r.peek() == Some(b'}') {
                    r.at += 1;
                    return Some(J::Obj(members));
                }
                loop {
                    if r.byte()? != b'"' {
                        return None;
                    }
                    let name = r.string()?;
                    if r.byte()? != b':' {
                        return None;
                    }
                    members.push((name, r.value()?));
                    match r.byte()? {
                        b',' => {}
                        b'}' => return Some(J::Obj(members)),
                        _ => return None,
                    }
                }
            }),
            b'[' => self.nested(|r| {
                let mut items = Vec::with_capacity(16); // a call-records leg has 15 slots
                if r.peek() == Some(b']') {
                    r.at += 1;
                    return Some(J::Arr(items));
                }
                loop {
                    items.push(r.value()?);
                    match r.byte()? {
                        b',' => {}
                        b']' => return Some(J::Arr(items)),
                        _ => return None,
                    }
                }
            }),
            b'"' => {
                let start = self.at;
                match self.string() {
                    Some(s) => Some(J::Str(s)),
                    None if self.escapes => self.escaped(start).map(J::Text),
                    None => None,
                }
            }
            b't' => self.word(b"rue", J::Bool(true)),
            b'f' => self.word(b"alse", J::Bool(false)),
            b'n' => self.word(b"ull", J::Null),
            b'-' | b'0'..=b'9' => self.number(self.at - 1),
            _ => None,
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.space();
        self.b.get(self.at).copied()
    }

    fn nested(&mut self, read: impl FnOnce(&mut Self) -> Option<J<'a>>) -> Option<J<'a>> {
        if self.depth == 32 {
            return None;
        }
        self.depth += 1;
        let value = read(self);
        self.depth -= 1;
        value
    }

    fn word(&mut self, rest: &[u8], value: J<'a>) -> Option<J<'a>> {
        let end = self.at + rest.len();
        (self.b.get(self.at..end)? == rest).then(|| {
            self.at = end;
            value
        })
    }

    /// The rest of a string after its opening quote: plain text only (no escape, no control).
    fn string(&mut self) -> Option<&'a str> {
        let start = self.at;
        loop {
            match *self.b.get(self.at)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        // Quotes are ASCII, so both ends are character boundaries of the (valid UTF-8) text.
        Some(&self.s[start..self.at - 1])
    }

    /// A string from its first character (at `start`), decoding the escapes orjson writes: `\"`,
    /// `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t` and `\u00XX` below 0x80 (a control character).
    /// Any other escape, or a raw control character, is None.
    fn escaped(&mut self, start: usize) -> Option<String> {
        self.at = start;
        let mut text = String::new();
        loop {
            match *self.b.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(text);
                }
                b'\\' => {
                    let c = match *self.b.get(self.at + 1)? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\x08',
                        b'f' => '\x0c',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self.b.get(self.at + 2..self.at + 6)?;
                            if !(hex[0] == b'0' && hex[1] == b'0' && hex[2] <= b'7' && hex[3].is_ascii_hexdigit()
                                 && hex[2].is_ascii_digit())
                            {
                                return None;
                            }
                            self.at += 4;
                            char::from(((hex[2] - b'0') << 4) | (hex[3] as char).to_digit(16)? as u8)
                        }
                        _ => return None,
                    };
                    self.at += 2;
                    text.push(c);
                }
                0..=0x1f => return None,
                _ => {
                    // A run of plain bytes; it ends at an ASCII byte (or the end), a character boundary.
                    let run = self.at;
                    while self.at < self.b.len() && !matches!(self.b[self.at], b'"' | b'\\' | 0..=0x1f) {
                        self.at += 1;
                    }
                    text.push_str(&self.s[run..self.at]);
                }
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.at < self.b.len() && self.b[self.at].is_ascii_digit() {
            self.at += 1;
        }
        self.at - start
    }

    /// A number as JSON writes it; None for one orjson might read otherwise than Rust (a long
    /// integer, a huge exponent).
    fn number(&mut self, start: usize) -> Option<J<'a>> {
        self.at = start + usize::from(self.b[start] == b'-');
        let first = *self.b.get(self.at)?;
        let whole = self.digits();
        if whole == 0 || (first == b'0' && whole > 1) || whole > 18 {
            return None;
        }
        let mut float = false;
        if self.b.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        if matches!(self.b.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.b.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if !(1..=3).contains(&self.digits()) {
                return None;
            }
            float = true;
        }
        let text = &self.s[start..self.at];
        if !float {
            return text.parse().ok().map(J::Int);
        }
        let value: f64 = text.parse().ok()?;
        // An underflow to zero, or an overflow, is where parsers may differ: leave it to Python.
        (value.is_finite() && (value != 0.0 || !text.bytes().any(|c| (b'1'..=b'9').contains(&c))))
            .then_some(J::Float(value))
    }
}

/// The whole value as one JSON document, or None.
pub(crate) fn read(raw: &[u8]) -> Option<J<'_>> {
    read_with(raw, false)
}

/// `read`, also decoding the escapes orjson writes in strings (into `J::Text`): how the fold of
/// call records (lib.rs) reads its calls' state, whose strings may hold any character.
pub(crate) fn read_escaped(raw: &[u8]) -> Option<J<'_>> {
    read_with(raw, true)
}

fn read_with(raw: &[u8], escapes: bool) -> Option<J<'_>> {
    let s = std::str::from_utf8(raw).ok()?;
    let mut reader = Reader { s, b: raw, at: 0, depth: 0, escapes };
    let value = reader.value()?;
    reader.space();
    (reader.at == raw.len()).then_some(value)
}

/// `TENANT_ID`: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
fn is_tenant(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[1..].iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `RECORD_NUMBER`: `\+?[0-9]{0,64}|anonymous`.
fn is_record_number(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    s == "anonymous" || (digits.len() <= 64 && digits.bytes().all(|c| c.is_ascii_digit()))
}

/// `RECORD_ID`: `[A-Za-z0-9_-]{1,128}`.
fn is_record_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

const YEAR_2200_MS: i64 = 7_258_118_400_000;

/// `_time`: Some(None) for a null a nullable field may hold, Some(Some(ms)) for a time laid out as
/// the call-records processor writes it, in the years 1970-2199; None for anything else.
fn time(v: Option<&J<'_>>, nullable: bool) -> Option<Option<i64>> {
    match v {
        None | Some(J::Null) => nullable.then_some(None),
        Some(J::Str(s)) => parse_time(s).filter(|ms| (0..YEAR_2200_MS).contains(ms)).map(Some),
        _ => None,
    }
}

/// `_str`: a string matching `ok`.
fn text<'a>(v: Option<&J<'a>>, ok: fn(&str) -> bool) -> Option<&'a str> {
    match v {
        Some(J::Str(s)) if ok(s) => Some(s),
        _ => None,
    }
}

/// `_seconds_ms`: `round(value * 1000)` of a number of seconds between 0 and 864000.
fn seconds_ms(v: Option<&J<'_>>) -> Option<i64> {
    match v {
        Some(&J::Int(n)) if (0..=864_000).contains(&n) => Some(n * 1000),
        Some(&J::Float(x)) if (0.0..=864_000.0).contains(&x) => Some((x * 1000.0).round_ties_even() as i64),
        _ => None,
    }
}

/// What `AcdCall` is built from, Python's `None` as `None`.
struct Call<'a> {
    tenant: &'a str,
    record_id: &'a str,
    revision: i64,
    outcome: &'static str,
    started_ms: i64,
    event_ms: i64,
    answered_ms: Option<i64>,
    wait_ms: i64,
    talk_ms: i64,
    callee: &'a str,
    redirecting: Option<&'a str>,
    legs: Vec<(&'a str, Option<i64>, Option<i64>)>,
}

/// `decode_record` of an ACD call (the record's tenant checked by the caller).
fn acd_call<'a>(rec: &J<'a>, tenant: &'a str) -> Option<Call<'a>> {
    let revision = match rec.get("revision") {
        Some(&J::Int(n)) if (1..=1_000_000).contains(&n) => n,
        _ => return None,
    };
    let started_ms = time(rec.get("started_at"), false)??;
    let ended = time(rec.get("ended_at"), true)?;
    let outcome = match rec.get("outcome") {
        Some(J::Str("answered")) => "a",
        Some(J::Str("voicemail")) => "v",
        Some(J::Str("abandoned" | "missed" | "no_answer")) => "b",
        _ => return None,
    };
    let Some(J::Arr(raw_legs)) = rec.get("legs") else { return None };
    if raw_legs.is_empty() || raw_legs.len() > 1024 {
        return None;
    }
    let mut legs = Vec::with_capacity(raw_legs.len());
    for leg in raw_legs {
        if !matches!(leg, J::Obj(_)) {
            return None;
        }
        let line = text(leg.get("account"), is_record_number)?;
        let connect = time(leg.get("connect_at"), true)?;
        let release = if connect.is_some() { time(leg.get("release_at"), true)? } else { None };
        legs.push((line, connect, release));
    }
    let redirecting = match rec.get("redirecting_number") {
        None | Some(J::Null) => None,
        v => Some(text(v, is_record_number)?),
    };
    Some(Call {
        tenant,
        record_id: text(rec.get("record_id"), is_record_id)?,
        revision,
        outcome,
        started_ms,
        event_ms: ended.unwrap_or(started_ms),
        answered_ms: time(rec.get("answered_at"), true)?,
        wait_ms: seconds_ms(rec.get("wait_seconds"))?,
        talk_ms: seconds_ms(rec.get("talk_seconds"))?,
        callee: text(rec.get("callee"), is_record_number)?,
        redirecting,
        legs,
    })
}

/// `processors.acd_stats.decode_record(key, value)` for a record it reads with certainty: the
/// `AcdCall` (built with `cls`) Python would return; None for anything else.
#[pyfunction]
pub fn decode_call_record<'py>(py: Python<'py>, key: &[u8], value: &[u8], schema: &str, cls: &Bound<'py, PyAny>)
                               -> PyResult<Option<Bound<'py, PyAny>>> {
    let Some(rec) = read(value) else { return Ok(None) };
    if !matches!(rec.get("schema"), Some(J::Str(s)) if *s == schema) {
        return Ok(None);
    }
    let Some(tenant) = text(rec.get("tenant"), is_tenant).filter(|t| t.as_bytes() == key) else {
        return Ok(None);
    };
    let is_acd = match rec.get("is_acd") {
        Some(&J::Bool(b)) => b,
        _ => return Ok(None),
    };
    if !is_acd {
        // Only its time is read: when it ended, else when it started.
        let at = match time(rec.get("ended_at"), true) {
            Some(Some(ms)) => ms,
            Some(None) => match time(rec.get("started_at"), false) {
                Some(Some(ms)) => ms,
                _ => return Ok(None),
            },
            None => return Ok(None),
        };
        let empty = intern!(py, "");
        let none = py.None();
        return build(py, cls, [tenant.into_bound_py_any(py)?, empty.clone().into_any(), 0.into_bound_py_any(py)?,
                               false.into_bound_py_any(py)?, empty.clone().into_any(), at.into_bound_py_any(py)?,
                               at.into_bound_py_any(py)?, none.clone_ref(py).into_bound(py), 0.into_bound_py_any(py)?,
                               0.into_bound_py_any(py)?, empty.clone().into_any(), none.into_bound(py),
                               PyTuple::empty(py).into_any()]);
    }
    let Some(c) = acd_call(&rec, tenant) else { return Ok(None) };
    let legs = PyTuple::new(py, c.legs.iter().map(|&(line, connect, release)| (line, connect, release)))?;
    let outcome = PyString::intern(py, c.outcome);
    build(py, cls, [c.tenant.into_bound_py_any(py)?, c.record_id.into_bound_py_any(py)?,
                    c.revision.into_bound_py_any(py)?, true.into_bound_py_any(py)?, outcome.into_any(),
                    c.started_ms.into_bound_py_any(py)?, c.event_ms.into_bound_py_any(py)?,
                    c.answered_ms.into_bound_py_any(py)?, c.wait_ms.into_bound_py_any(py)?,
                    c.talk_ms.into_bound_py_any(py)?, c.callee.into_bound_py_any(py)?,
                    c.redirecting.into_bound_py_any(py)?, legs.into_any()])
}

/// `cls(*fields)`, the `AcdCall` in its fields' order.
fn build<'py>(py: Python<'py>, cls: &Bound<'py, PyAny>, fields: [Bound<'py, PyAny>; 13])
              -> PyResult<Option<Bound<'py, PyAny>>> {
    cls.call1(PyTuple::new(py, fields)?).map(Some)
}

// -- rendering the figures ------------------------------------------------------------------

/// A float as orjson writes it (its shortest repr, `.0` when whole), for the magnitudes figures
/// hold (0, or 1e-5 to 1e15, where both write plain decimals); None for another.
fn put_float(out: &mut Vec<u8>, x: f64) -> Option<()> {
    let magnitude = x.abs();
    if magnitude != 0.0 && !(1e-5..1e15).contains(&magnitude) {
        return None; // also NaN and the infinities
    }
    let start = out.len();
    write!(out, "{x}").ok()?;
    if !out[start..].contains(&b'.') {
        out.extend_from_slice(b".0");
    }
    Some(())
}

/// An `int` (not a `bool`) that fits in an i64.
fn int(v: &Bound<'_, PyAny>) -> Option<i64> {
    v.downcast_exact::<PyInt>().ok()?.extract().ok()
}

/// `round(x, digits)` as Python rounds a float: the nearest decimal (ties to even), read back.
fn py_round(x: f64, digits: usize) -> Option<f64> {
    format!("{x:.digits$}").parse().ok()
}

/// The `DERIVED` figures (`derived_values` of schemas/acd_stats.py) of the counts and the sums
/// (milliseconds); None for a formula it does not know.
#[allow(clippy::cast_precision_loss)] // counts and sums are checked below 2^40
fn derived(c: &[i64], s: &[i64], formula: &str, exclude_short: bool) -> Option<[Option<f64>; 5]> {
    if c.iter().chain(s).any(|v| v.unsigned_abs() >= 1 << 40) {
        return None;
    }
    let (offered, answered, abandoned, short, answered_sl, abandoned_sl) = (c[0], c[1], c[2], c[4], c[5], c[6]);
    let (b, b_sl) = if exclude_short { (abandoned - short, abandoned_sl - short) } else { (abandoned, abandoned_sl) };
    let (num, den) = match formula {
        "abandons_against" => (answered_sl, answered + b),
        "abandons_within_sl_ignored" => (answered_sl, answered + b - b_sl),
        "abandons_within_sl_count_for" => (answered_sl + b_sl, answered + b),
        "abandons_ignored" => (answered_sl, answered),
        _ => return None,
    };
    let level = if den > 0 { Some(py_round(num as f64 / den as f64, 4)?) } else { None };
    let mean = |ms: i64, n: i64| -> Option<Option<f64>> {
        Some(if n > 0 { Some(py_round(ms as f64 / 1000.0 / n as f64, 3)?) } else { None })
    };
    Some([level, mean(s[1], answered)?, mean(s[0], offered)?, mean(s[2], abandoned)?, mean(s[3], answered)?])
}

/// An interval's figures as `AcdStatsLogic.figures` returns them, written as orjson writes them.
#[pyclass(frozen)]
pub struct Figures {
    /// `"name":` of each count, sum and derived figure, written once.
    counts: Vec<Vec<u8>>,
    sums: Vec<Vec<u8>>,
    derived: Vec<Vec<u8>>,
}

fn member_names(names: &[String]) -> Vec<Vec<u8>> {
    names.iter().map(|name| {
        let mut member = Vec::with_capacity(name.len() + 3);
        put_str(&mut member, name);
        member.push(b':');
        member
    }).collect()
}

#[pymethods]
impl Figures {
    /// The names of the counts, the sums and the derived figures, in their order (`COUNTS`,
    /// `SUMS`, `DERIVED` of schemas/acd_stats.py).
    #[new]
    fn new(counts: Vec<String>, sums: Vec<String>, derived: Vec<String>) -> PyResult<Figures> {
        if counts.len() != 7 || sums.len() != 4 || derived.len() != 5 {
            return Err(pyo3::exceptions::PyValueError::new_err("7 counts, 4 sums and 5 derived figures expected"));
        }
        Ok(Figures { counts: member_names(&counts), sums: member_names(&sums), derived: member_names(&derived) })
    }

    /// The value of the interval `agg` (its state, a dict or the JSON the store holds, as
    /// `count_call` returns it) at `now_ms`: `head` (the fields that never change, as the start
    /// of a JSON object), the revision, final flag and update time, the counts and sums, `middle`
    /// (the service-level settings), the derived figures under `formula` and `exclude_short`,
    /// `tail` (the thresholds), the longest wait and the agents. `middle` and `tail` are JSON
    /// members, each followed by a comma. None for a state of another shape, which Python renders.
    #[allow(clippy::too_many_arguments)]
    fn render<'py>(&self, py: Python<'py>, head: &[u8], agg: &Bound<'py, PyAny>, now_ms: i64, formula: &str,
                   exclude_short: bool, middle: &[u8], tail: &[u8]) -> Option<Bound<'py, PyBytes>> {
        let out = if let Ok(raw) = agg.downcast::<PyBytes>() {
            let agg = Agg::read(raw.as_bytes())?;
            let state = State {
                counts: agg.counts,
                sums: agg.sums,
                revision: agg.rev,
                last: agg.last,
                max_wait: agg.max_wait,
                agents: agg.agents,
            };
            self.write_state(head, state, now_ms, formula, exclude_short, middle, tail)?
        } else {
            self.write(py, head, agg.downcast_exact::<PyDict>().ok()?, now_ms, formula, exclude_short, middle, tail)?
        };
        Some(PyBytes::new(py, &out))
    }
}

impl Figures {
    /// `render` of a state held as a Python dict.
    #[allow(clippy::too_many_arguments)]
    fn write<'py>(&self, py: Python<'py>, head: &[u8], agg: &Bound<'py, PyDict>, now_ms: i64, formula: &str,
             exclude_short: bool, middle: &[u8], tail: &[u8]) -> Option<Vec<u8>> {
        let item = |name: &Bound<'py, PyString>| -> Option<Bound<'py, PyAny>> { agg.get_item(name).ok().flatten() };
        let ints = |v: Bound<'py, PyAny>, len: usize| -> Option<Vec<i64>> {
            let l = v.downcast_into_exact::<PyList>().ok()?;
            (l.len() == len).then(|| l.iter().map(|v| int(&v)).collect::<Option<Vec<i64>>>())?
        };
        let counts = ints(item(intern!(py, "c"))?, 7)?.try_into().ok()?;
        let sums = ints(item(intern!(py, "s"))?, 4)?.try_into().ok()?;
        let revision = int(&item(intern!(py, "rev"))?)?;
        let last = item(intern!(py, "final"))?.downcast_into_exact::<PyBool>().ok()?.is_true();
        let max_wait = int(&item(intern!(py, "mx"))?)?;
        let agents_dict = item(intern!(py, "ag"))?.downcast_into_exact::<PyDict>().ok()?;
        let mut lines = Vec::with_capacity(agents_dict.len());
        for (line, figures) in agents_dict.iter() {
            let figures = ints(figures, 3)?;
            lines.push((line.downcast_into_exact::<PyString>().ok()?, [figures[0], figures[1], figures[2]]));
        }
        // Text orjson can write (no lone surrogate), borrowed while `lines` holds the strings.
        let agents = lines.iter().map(|(line, a)| Some((line.to_str().ok()?, *a))).collect::<Option<Vec<_>>>()?;
        let state = State { counts, sums, revision, last, max_wait, agents };
        self.write_state(head, state, now_ms, formula, exclude_short, middle, tail)
    }

    /// The figures of an interval's state, written as orjson writes `AcdStatsLogic.figures`.
    #[allow(clippy::too_many_arguments)]
    fn write_state(&self, head: &[u8], mut state: State<'_>, now_ms: i64, formula: &str, exclude_short: bool,
                   middle: &[u8], tail: &[u8]) -> Option<Vec<u8>> {
        let (counts, sums) = (&state.counts, &state.sums);
        let derived = derived(counts, sums, formula, exclude_short)?;
        // `sorted` of the items: by line (keys differ; code point order is UTF-8's byte order).
        state.agents.sort_unstable_by(|a, b| a.0.cmp(b.0));

        let mut out = Vec::with_capacity(head.len() + 600 + 100 * state.agents.len());
        out.extend_from_slice(head);
        out.extend_from_slice(b"\"revision\":");
        put_int(&mut out, state.revision);
        out.extend_from_slice(if state.last { b",\"final\":true,\"updated_at\":" } else { b",\"final\":false,\"updated_at\":" });
        put_time(&mut out, now_ms);
        for (name, &n) in self.counts.iter().zip(counts) {
            out.push(b',');
            out.extend_from_slice(name);
            put_int(&mut out, n);
        }
        for (name, &ms) in self.sums.iter().zip(sums) {
            out.push(b',');
            out.extend_from_slice(name);
            put_ms_as_seconds(&mut out, ms)?;
        }
        out.push(b',');
        out.extend_from_slice(middle);
        for (name, value) in self.derived.iter().zip(derived) {
            out.extend_from_slice(name);
            match value {
                Some(x) => put_float(&mut out, x)?,
                None => out.extend_from_slice(b"null"),
            }
            out.push(b',');
        }
        out.extend_from_slice(tail);
        out.extend_from_slice(b"\"max_wait_seconds\":");
        if state.max_wait >= 0 {
            put_ms_as_seconds(&mut out, state.max_wait)?;
        } else {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b",\"agents\":[");
        for (i, (line, a)) in state.agents.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"line\":");
            put_str(&mut out, line);
            out.extend_from_slice(b",\"offered\":");
            put_int(&mut out, a[0]);
            out.extend_from_slice(b",\"answered\":");
            put_int(&mut out, a[1]);
            out.extend_from_slice(b",\"missed\":");
            put_int(&mut out, a[0].checked_sub(a[1])?);
            out.extend_from_slice(b",\"talk_seconds\":");
            put_ms_as_seconds(&mut out, a[2])?;
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Some(out)
    }
}

/// What the figures are rendered from: an interval's state, its agents' lines borrowed.
struct State<'a> {
    counts: [i64; 7],
    sums: [i64; 4],
    revision: i64,
    last: bool,
    max_wait: i64,
    agents: Vec<(&'a str, [i64; 3])>,
}

// -- counting an ACD call -------------------------------------------------------------------

/// An interval's state (`a/t/q/iv`) as `_new_interval` makes it, its members in that order.
struct Agg<'a> {
    t: &'a str,
    q: &'a str,
    iv: i64,
    m: i64,
    rev: i64,
    last: bool,
    n: i64,
    counts: [i64; 7],
    sums: [i64; 4],
    max_wait: i64,
    /// Each agent's line and (offered, answered, talk ms), in the dict's order.
    agents: Vec<(&'a str, [i64; 3])>,
}

const AGG_MEMBERS: [&str; 11] = ["t", "q", "iv", "m", "rev", "final", "n", "c", "s", "mx", "ag"];

/// A JSON array of exactly `N` integers.
fn ints<const N: usize>(v: &J<'_>) -> Option<[i64; N]> {
    let J::Arr(items) = v else { return None };
    if items.len() != N {
        return None;
    }
    let mut out = [0; N];
    for (o, item) in out.iter_mut().zip(items) {
        let J::Int(i) = item else { return None };
        *o = *i;
    }
    Some(out)
}

impl<'a> Agg<'a> {
    /// The state `_load` reads, when it has exactly the members `_new_interval` gives, in their
    /// order, each of its type, and a longest wait known (null, to recompute, is Python's).
    fn read(raw: &'a [u8]) -> Option<Agg<'a>> {
        let J::Obj(members) = read(raw)? else { return None };
        if members.len() != AGG_MEMBERS.len() || members.iter().zip(AGG_MEMBERS).any(|((k, _), name)| *k != name) {
            return None;
        }
        let int = |i: usize| match members[i].1 {
            J::Int(n) => Some(n),
            _ => None,
        };
        let (J::Str(t), J::Str(q), J::Bool(last), J::Obj(ag)) = (&members[0].1, &members[1].1, &members[5].1, &members[10].1)
        else {
            return None;
        };
        let mut agents = Vec::with_capacity(ag.len() + 4);
        for (line, figures) in ag {
            if agents.iter().any(|(l, _)| l == line) {
                return None; // a dict holds one
            }
            agents.push((*line, ints::<3>(figures)?));
        }
        Some(Agg {
            t,
            q,
            iv: int(2)?,
            m: int(3)?,
            rev: int(4)?,
            last: *last,
            n: int(6)?,
            counts: ints(&members[7].1)?,
            sums: ints(&members[8].1)?,
            max_wait: int(9)?,
            agents,
        })
    }

    /// `orjson.dumps` of the state.
    fn write(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + 32 * self.agents.len());
        out.extend_from_slice(b"{\"t\":");
        put_str(&mut out, self.t);
        out.extend_from_slice(b",\"q\":");
        put_str(&mut out, self.q);
        for (name, n) in [(&b",\"iv\":"[..], self.iv), (b",\"m\":", self.m), (b",\"rev\":", self.rev)] {
            out.extend_from_slice(name);
            put_int(&mut out, n);
        }
        out.extend_from_slice(if self.last { b",\"final\":true,\"n\":" } else { b",\"final\":false,\"n\":" });
        put_int(&mut out, self.n);
        out.extend_from_slice(b",\"c\":");
        put_ints(&mut out, &self.counts);
        out.extend_from_slice(b",\"s\":");
        put_ints(&mut out, &self.sums);
        out.extend_from_slice(b",\"mx\":");
        put_int(&mut out, self.max_wait);
        out.extend_from_slice(b",\"ag\":{");
        for (i, (line, a)) in self.agents.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            put_str(&mut out, line);
            out.push(b':');
            put_ints(&mut out, a);
        }
        out.extend_from_slice(b"}}");
        out
    }
}

fn put_ints(out: &mut Vec<u8>, values: &[i64]) {
    out.push(b'[');
    for (i, &v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        put_int(out, v);
    }
    out.push(b']');
}

/// `AcdStatsLogic.on_event` for an ACD call counted for the first time (the caller found no
/// contribution under `kkey`, and checked the interval is open to it), in the interval `akey`
/// (`queue`, `iv`, `minutes` long, ending at `end_ms`): stages what Python stages, in the same
/// order (the interval's timer when it is new, the member entry `mprefix` + slot, the call's
/// contribution, the interval's state) and returns the interval's new state. None, before any
/// write, for a state or a call it does not expect, which Python then counts.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn count_call<'py>(py: Python<'py>, store: &Bound<'py, PyAny>, call: &Bound<'py, PyAny>, kkey: &str, akey: &str,
                       mprefix: &str, queue: &str, iv: i64, minutes: i64, end_ms: i64, grace_ms: i64,
                       restate_ms: i64, service_level_ms: f64, short_abandon_ms: f64, now_ms: i64)
                       -> PyResult<Option<Bound<'py, PyBytes>>> {
    let Some(c) = counted(py, call) else { return Ok(None) };
    let view = crate::StoreView::of(store)?;
    let stored = view.get(akey)?;
    let interval = Interval { queue, iv, minutes, end_ms, grace_ms, service_level_ms, short_abandon_ms };
    let Some(done) = count(&c, stored.as_deref(), &interval, now_ms) else { return Ok(None) };
    // The writes, in Python's order.
    if stored.is_none() {
        view.wake(akey, end_ms + if done.last { restate_ms } else { grace_ms })?;
    }
    view.stage(&format!("{mprefix}{}", done.slot), Some(c.record_id.as_bytes()))?;
    view.stage(kkey, Some(&done.contribution))?;
    view.stage(akey, Some(&done.state))?;
    Ok(Some(PyBytes::new(py, &done.state)))
}

/// The interval a call is counted in, and the tenant's settings `_contribution` reads.
struct Interval<'a> {
    queue: &'a str,
    iv: i64,
    minutes: i64,
    end_ms: i64,
    grace_ms: i64,
    service_level_ms: f64,
    short_abandon_ms: f64,
}

/// What counting a call writes: its slot in the interval, its contribution, the interval's new
/// state and whether it is final.
struct Done {
    slot: i64,
    contribution: Vec<u8>,
    state: Vec<u8>,
    last: bool,
}

/// `_contribution`, `_apply(agg, contribution, +1)` and `_emit`'s new revision, on the interval's
/// state as stored (None: a new interval); None for a state it does not expect, or a sum past i64.
fn count(c: &Counted, stored: Option<&[u8]>, at: &Interval<'_>, now_ms: i64) -> Option<Done> {
    let mut agg = match stored {
        Some(raw) => Agg::read(raw).filter(|agg| agg.t == c.tenant && agg.q == at.queue && agg.iv == at.iv
                                                 && agg.m == at.minutes)?,
        None => Agg {
            t: &c.tenant,
            q: at.queue,
            iv: at.iv,
            m: at.minutes,
            rev: 0,
            last: now_ms >= at.end_ms + at.grace_ms,
            n: 0,
            counts: [0; 7],
            sums: [0; 4],
            max_wait: -1,
            agents: Vec::new(),
        },
    };
    let (o, w) = (c.outcome.as_str(), c.wait_ms);
    #[allow(clippy::cast_precision_loss)] // a wait is at most 864,000,000 ms
    let wait = w as f64;
    let within_sl = o != "v" && wait <= at.service_level_ms;
    let short = o == "b" && wait < at.short_abandon_ms;
    let voicemail_at = if o == "v" { c.answered_ms } else { None };
    let mut agents: Vec<(&str, [i64; 3])> = Vec::new();
    for (line, connect, release) in &c.legs {
        let i = match agents.iter().position(|(l, _)| l == line) {
            Some(i) => i,
            None => {
                agents.push((line, [0; 3]));
                agents.len() - 1
            }
        };
        let a = &mut agents[i].1;
        a[0] += 1;
        if let Some(connect) = *connect {
            if Some(connect) != voicemail_at {
                a[1] += 1;
                if let Some(release) = release {
                    a[2] = a[2].checked_add(release.checked_sub(connect)?.max(0))?;
                }
            }
        }
    }
    let talk = if o == "a" { c.talk_ms } else { 0 };
    let slot = agg.n;
    let mut contribution = Vec::with_capacity(96 + 32 * agents.len());
    contribution.push(b'[');
    put_str(&mut contribution, at.queue);
    for v in [at.iv, slot, c.revision] {
        contribution.push(b',');
        put_int(&mut contribution, v);
    }
    contribution.push(b',');
    put_str(&mut contribution, o);
    for v in [w, talk, i64::from(within_sl) | (i64::from(short) << 1)] {
        contribution.push(b',');
        put_int(&mut contribution, v);
    }
    contribution.extend_from_slice(b",[");
    for (i, (line, a)) in agents.iter().enumerate() {
        if i > 0 {
            contribution.push(b',');
        }
        contribution.push(b'[');
        put_str(&mut contribution, line);
        for &v in a {
            contribution.push(b',');
            put_int(&mut contribution, v);
        }
        contribution.push(b']');
    }
    contribution.extend_from_slice(b"]]");
    let add = |x: &mut i64, v: i64| -> Option<()> {
        *x = x.checked_add(v)?;
        Some(())
    };
    let (counts, sums) = (&mut agg.counts, &mut agg.sums);
    add(&mut counts[0], 1)?;
    add(&mut sums[0], w)?;
    match o {
        "a" => {
            add(&mut counts[1], 1)?;
            add(&mut sums[1], w)?;
            add(&mut sums[3], talk)?;
            if within_sl {
                add(&mut counts[5], 1)?;
            }
        }
        "b" => {
            add(&mut counts[2], 1)?;
            add(&mut sums[2], w)?;
            if short {
                add(&mut counts[4], 1)?;
            }
            if within_sl {
                add(&mut counts[6], 1)?;
            }
        }
        _ => add(&mut counts[3], 1)?,
    }
    agg.max_wait = agg.max_wait.max(w);
    for (line, figures) in &agents {
        let i = match agg.agents.iter().position(|(l, _)| l == line) {
            Some(i) => i,
            None => {
                agg.agents.push((line, [0; 3]));
                agg.agents.len() - 1
            }
        };
        let a = &mut agg.agents[i].1;
        for (x, v) in a.iter_mut().zip(figures) {
            add(x, *v)?;
        }
        if a[0] <= 0 {
            agg.agents.remove(i);
        }
    }
    agg.n += 1;
    agg.rev += 1;
    Some(Done { slot, contribution, state: agg.write(), last: agg.last })
}

/// What `count_call` reads of an `AcdCall`.
struct Counted {
    tenant: String,
    record_id: String,
    revision: i64,
    outcome: String,
    answered_ms: Option<i64>,
    wait_ms: i64,
    talk_ms: i64,
    legs: Vec<(String, Option<i64>, Option<i64>)>,
}

/// The fields of an ACD call, each of the type `decode_record` gives it; None for any other.
fn counted<'py>(py: Python<'py>, call: &Bound<'py, PyAny>) -> Option<Counted> {
    let get = |name: &Bound<'py, PyString>| -> Option<Bound<'py, PyAny>> { call.getattr(name).ok() };
    let int_of = |name: &Bound<'py, PyString>| get(name).and_then(|v| int(&v));
    let text = |name: &Bound<'py, PyString>| -> Option<String> {
        Some(get(name)?.downcast_into_exact::<PyString>().ok()?.to_str().ok()?.to_owned())
    };
    let answered = get(intern!(py, "answered_ms"))?;
    let answered_ms = if answered.is_none() { None } else { Some(int(&answered)?) };
    let legs_tuple = get(intern!(py, "legs"))?.downcast_into_exact::<PyTuple>().ok()?;
    let mut legs = Vec::with_capacity(legs_tuple.len());
    for leg in legs_tuple.iter() {
        let leg = leg.downcast_into_exact::<PyTuple>().ok()?;
        if leg.len() != 3 {
            return None;
        }
        let time = |v: Bound<'_, PyAny>| -> Option<Option<i64>> {
            if v.is_none() { Some(None) } else { Some(Some(int(&v)?)) }
        };
        let line = leg.get_item(0).ok()?.downcast_into_exact::<PyString>().ok()?.to_str().ok()?.to_owned();
        legs.push((line, time(leg.get_item(1).ok()?)?, time(leg.get_item(2).ok()?)?));
    }
    let outcome = text(intern!(py, "outcome"))?;
    if !matches!(outcome.as_str(), "a" | "b" | "v") {
        return None;
    }
    Some(Counted {
        tenant: text(intern!(py, "tenant"))?,
        record_id: text(intern!(py, "record_id"))?,
        revision: int_of(intern!(py, "revision"))?,
        outcome,
        answered_ms,
        wait_ms: int_of(intern!(py, "wait_ms"))?,
        talk_ms: int_of(intern!(py, "talk_ms"))?,
        legs,
    })
}
