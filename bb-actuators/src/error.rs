use thiserror::Error;

/// Errors of the selection kernels. Every variant names what was wrong.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ActuatorError {
    /// A buffer does not have the length its shape implies.
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        /// Which buffer.
        what: String,
        /// Length implied by the shape.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A shape is degenerate or inconsistent.
    #[error("shape: {0}")]
    Shape(String),
    /// A value is NaN or infinite.
    #[error("{what}: non-finite value at flat index {index}")]
    NonFinite {
        /// Which buffer.
        what: String,
        /// Position of the first bad value.
        index: usize,
    },
}
