//! `Store.commit`'s loop (processors/state.py) in Rust: each staged entry applied to the committed
//! entries, the clocks and the timer heaps, as `Store._apply` does it, in the staged dict's order.
//!
//! The Python `Store._apply` is the specification; tests/unit/test_store.py commits the same
//! transactions through both and compares the entries, the clocks and every heap, element for
//! element. A timer's entry is what made the Python loop slow (its domain sliced out of the key
//! into a new string, its time parsed from the value, a push): here the domain's heap is found by
//! the key's bytes, and the time read from the value's digits.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::collections::HashMap;

/// `state._WAKE`, `state._TIME`, `state._SEP`.
pub(crate) const WAKE: &str = "\0rt/wake/";
const TIME: &str = "\0rt/time/";
pub(crate) const SEP: &str = "\x1f";

/// The integer a clock's or timer's value holds, when written as our code writes them (an optional
/// minus and at most 18 digits); None for anything else, which Python's `int()` then reads.
fn canonical_int(raw: &[u8]) -> Option<i64> {
    let (negative, digits) = match raw.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, raw),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if negative { -n } else { n })
}

/// `int(value)` of a clock's or timer's value.
fn int_of<'py>(py: Python<'py>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(raw) = value.downcast::<PyBytes>() {
        if let Some(n) = canonical_int(raw.as_bytes()) {
            return Ok(n.into_pyobject(py)?.into_any());
        }
    }
    py.get_type::<pyo3::types::PyInt>().call1((value,))
}

/// `for key, value in entries.items(): store._apply(key, value, popped)`, with the store's
/// committed entries (`_data`), timer heaps (`_heaps`) and clocks (`_times`), and the timers
/// `due` took from the heaps in this transaction (`popped`, a set).
#[pyfunction]
pub fn apply_entries(
    entries: &Bound<'_, PyDict>,
    data: &Bound<'_, PyDict>,
    heaps: &Bound<'_, PyDict>,
    times: &Bound<'_, PyDict>,
    popped: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = entries.py();
    let heappush = py.import(intern!(py, "heapq"))?.getattr(intern!(py, "heappush"))?;
    // The heaps of the domains met in this call, by the domain's text (a transaction's timers
    // belong to a few tenants; a new string per entry was most of a timer's cost).
    let mut by_domain: HashMap<String, Bound<'_, PyList>> = HashMap::new();
    for (key, value) in entries.iter() {
        let key = key.downcast_into::<PyString>()?;
        let text = key.to_str()?;
        if value.is_none() {
            if data.contains(&key)? {
                data.del_item(&key)?;
            }
            if let Some(domain) = text.strip_prefix(TIME) {
                if times.contains(domain)? {
                    times.del_item(domain)?;
                }
            }
            continue;
        }
        if !text.starts_with('\0') {
            data.set_item(&key, &value)?;
            continue;
        }
        let old = data.get_item(&key)?;
        data.set_item(&key, &value)?;
        if let Some(rest) = text.strip_prefix(WAKE) {
            // Pushed unless an earlier entry of the same timer stands (`_apply` says why).
            let at = int_of(py, &value)?;
            let push = match old {
                None => true,
                Some(old) => popped.contains(&key)? || at.lt(int_of(py, &old)?)?,
            };
            if !push {
                continue;
            }
            let Some(end) = rest.find(SEP) else {
                // As `str.index` does when the separator is missing.
                return Err(pyo3::exceptions::PyValueError::new_err("substring not found"));
            };
            let domain = &rest[..end];
            let heap = match by_domain.get(domain) {
                Some(heap) => heap.clone(),
                None => {
                    let heap = match heaps.get_item(domain)? {
                        Some(heap) => heap.downcast_into::<PyList>()?,
                        None => {
                            let heap = PyList::empty(py);
                            heaps.set_item(domain, &heap)?;
                            heap
                        }
                    };
                    by_domain.insert(domain.to_owned(), heap.clone());
                    heap
                }
            };
            let item = PyTuple::new(py, [at, key.into_any()])?;
            heappush.call1((heap, item))?;
        } else if let Some(domain) = text.strip_prefix(TIME) {
            times.set_item(domain, int_of(py, &value)?)?;
        }
    }
    Ok(())
}
