//! The error type of bb-theory: every variant names the offending field.

/// What went wrong, and in which input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TheoryError {
    /// An input sequence has no elements.
    #[error("`{field}` is empty")]
    Empty {
        /// The input's name.
        field: &'static str,
    },
    /// One element of an input sequence is out of its domain.
    #[error("`{field}[{index}]` = {value} is invalid: expected {expected}")]
    InvalidElement {
        /// The input's name.
        field: &'static str,
        /// Position of the first offending element.
        index: usize,
        /// Its value.
        value: f64,
        /// The domain, in words.
        expected: &'static str,
    },
    /// A scalar input is out of its domain.
    #[error("`{field}` = {value} is invalid: expected {expected}")]
    InvalidValue {
        /// The input's name.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The domain, in words.
        expected: &'static str,
    },
    /// Two inputs that must pair up element by element differ in length.
    #[error("`{left}` has {left_len} elements but `{right}` has {right_len}")]
    LengthMismatch {
        /// First input's name.
        left: &'static str,
        /// Its length.
        left_len: usize,
        /// Second input's name.
        right: &'static str,
        /// Its length.
        right_len: usize,
    },
    /// The inputs are valid one by one but do not determine an answer.
    #[error("`{field}`: {reason}")]
    Degenerate {
        /// The input that makes the problem degenerate.
        field: &'static str,
        /// Why, in words.
        reason: String,
    },
    /// The pruning engine refused a configuration or a call.
    #[error("engine: {0}")]
    Engine(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TheoryError>;

/// Checks that `xs` is non-empty and every element is finite and `> 0`.
pub(crate) fn check_positive(field: &'static str, xs: &[f64]) -> Result<()> {
    if xs.is_empty() {
        return Err(TheoryError::Empty { field });
    }
    for (index, &value) in xs.iter().enumerate() {
        if !(value.is_finite() && value > 0.0) {
            return Err(TheoryError::InvalidElement {
                field,
                index,
                value,
                expected: "a finite number > 0",
            });
        }
    }
    Ok(())
}

/// Checks a scalar against a predicate, naming the field and its domain on failure.
pub(crate) fn check_value(
    field: &'static str,
    value: f64,
    ok: bool,
    expected: &'static str,
) -> Result<()> {
    if ok && !value.is_nan() {
        Ok(())
    } else {
        Err(TheoryError::InvalidValue {
            field,
            value,
            expected,
        })
    }
}
