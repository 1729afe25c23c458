//! Bounds on what one chat-template rendering may build (issue 20: a template is a stranger's
//! file). minijinja's fuel stops loops and its recursion limit stops recursion, and it refuses
//! string repeats over 100 MB; what it leaves open is a value that is cheap to make and huge to
//! write: `[1] * 10**12` (a lazy sequence of 10^12 items), `'x' | indent(10**12)`,
//! `tojson(indent=10**12)`. Here a value is counted before it is written (at most
//! [`MAX_ITEMS`] items, nested ones included), a render writes at most [`MAX_OUTPUT`] bytes, and
//! widths are at most [`MAX_WIDTH`]; each ends the render with an error saying which.
//!
//! Left open: a template that doubles a string in a loop (`{% set ns.s = ns.s ~ ns.s %}`)
//! without writing it builds it in memory; fuel ends the loop, but after about 20 doublings.

use std::cell::Cell;

use minijinja::value::{Kwargs, StringInput, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State, Value};

/// Items of one written (or serialized) value, nested ones included.
pub const MAX_ITEMS: usize = 1_000_000;
/// Bytes one rendering writes.
pub const MAX_OUTPUT: usize = 256 << 20;
/// Spaces of an `indent` width.
pub const MAX_WIDTH: usize = 1024;

thread_local! {
    /// Bytes the rendering on this thread has written so far.
    static WRITTEN: Cell<usize> = const { Cell::new(0) };
}

/// Call before each rendering: the output budget starts again.
pub(super) fn start_render() {
    WRITTEN.with(|w| w.set(0));
}

/// Installs the bounded formatter and `indent` filter.
pub(super) fn install(env: &mut Environment<'_>) {
    env.set_formatter(formatter);
    env.add_filter("indent", indent);
}

fn too_big(what: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, what)
}

/// Errs when `value` holds more than [`MAX_ITEMS`] items, counting nested ones, without walking
/// more than that many.
pub(super) fn check_items(value: &Value) -> Result<(), Error> {
    fn walk(value: &Value, budget: &mut usize) -> Result<(), Error> {
        if !matches!(
            value.kind(),
            ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
        ) {
            return Ok(());
        }
        let n = value.len().unwrap_or(0);
        if n > *budget {
            return Err(too_big(format!(
                "the chat template builds a value of more than {MAX_ITEMS} items; fix the template or pick another model's"
            )));
        }
        *budget -= n;
        if let Ok(items) = value.try_iter() {
            for item in items.take(n) {
                walk(&item, budget)?;
                if value.kind() == ValueKind::Map {
                    walk(&value.get_item(&item).unwrap_or_default(), budget)?;
                }
            }
        }
        Ok(())
    }
    walk(value, &mut MAX_ITEMS.clone())
}

/// minijinja's formatter, after checking the value's size and the render's output budget.
fn formatter(out: &mut Output<'_>, state: &State<'_, '_>, value: &Value) -> Result<(), Error> {
    check_items(value)?;
    let len = value
        .as_str()
        .map_or_else(|| value.to_string().len(), str::len);
    let total = WRITTEN.with(|w| {
        let t = w.get().saturating_add(len);
        w.set(t);
        t
    });
    if total > MAX_OUTPUT {
        return Err(too_big(format!(
            "the chat template writes more than {} MB; fix the template or pick another model's",
            MAX_OUTPUT >> 20
        )));
    }
    minijinja::escape_formatter(out, state, value)
}

/// A width argument, at most [`MAX_WIDTH`].
pub(super) fn width(n: usize) -> Result<usize, Error> {
    if n > MAX_WIDTH {
        return Err(too_big(format!(
            "the chat template asks for an indent of {n} (at most {MAX_WIDTH}); fix the template or pick another model's"
        )));
    }
    Ok(n)
}

/// minijinja's `indent` with the width bounded.
fn indent(
    value: StringInput<'_>,
    w: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let w = match w {
        Some(w) => Some(width(w)?),
        None => kwargs
            .get::<Option<usize>>("width")?
            .map(width)
            .transpose()?,
    };
    minijinja::filters::indent(value, w, first, blank, kwargs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::template::{ChatTemplate, TemplateError};
    use serde_json::json;

    #[test]
    fn values_cheap_to_make_and_huge_to_write_end_in_an_error() {
        for (src, says) in [
            ("{{ [1] * 10**12 }}", "items"),
            ("{{ [[1] * 10**12] }}", "items"),
            ("{{ {'a': [0] * 10**9} }}", "items"),
            ("{{ ([1] * 10**12) | tojson }}", "items"),
            ("{{ 'x' | indent(10**12) }}", "indent of"),
            ("{{ 'x' | indent(width=10**12) }}", "indent of"),
            ("{{ messages | tojson(indent=10**12) }}", "indent of"),
            (
                "{% for i in range(10) %}{{ 'x' * 90000000 }}{% endfor %}",
                "writes more than",
            ),
            ("{{ 'x' * 10**12 }}", "too large"),
        ] {
            let t = ChatTemplate::new(src, None, None).unwrap();
            let err = t.render(&[json!({"role": "user", "content": "hi"})], None, false);
            let Err(TemplateError::Render(msg)) = err else {
                panic!("{src}: {:?}", err.map(|s| s.len()))
            };
            assert!(msg.contains(says), "{src}: {msg}");
        }
        // What real templates do still works.
        let t = ChatTemplate::new(
            "{{ messages | tojson(indent=2) }}{{ 'a\nb' | indent(4, true) }}{{ [1, 2] * 3 }}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[json!({"role": "user"})], None, false).unwrap();
        assert!(out.ends_with("    a\n    b[1, 2, 1, 2, 1, 2]"), "{out}");
    }
}
