use bb_actuators::ActuatorError;
use thiserror::Error;

/// Errors of the engine. Each names the config field, layer or population at fault.
#[derive(Debug, Error)]
pub enum BbError {
    /// A config value is invalid; `field` is its dotted path (e.g. `policy.beta`).
    #[error("{field}: {msg}")]
    Config {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// Something about one layer is wrong (shapes, non-finite weights, a missing activity).
    #[error("layer `{layer}`: {msg}")]
    Layer {
        /// Layer name.
        layer: String,
        /// What is wrong.
        msg: String,
    },
    /// Activations given for a population are wrong (shape, NaN or Inf).
    #[error("population `{population}`: {msg}")]
    Population {
        /// Population name (empty until the pruner fills it in).
        population: String,
        /// What is wrong.
        msg: String,
    },
    /// A config or state could not be parsed.
    #[error("{0}")]
    Parse(String),
}

impl BbError {
    pub(crate) fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        BbError::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn layer(layer: impl Into<String>, msg: impl Into<String>) -> Self {
        BbError::Layer {
            layer: layer.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn activations(msg: impl Into<String>) -> Self {
        BbError::Population {
            population: String::new(),
            msg: msg.into(),
        }
    }

    pub(crate) fn in_population(self, name: &str) -> Self {
        match self {
            BbError::Population { msg, .. } => BbError::Population {
                population: name.into(),
                msg,
            },
            e => e,
        }
    }

    pub(crate) fn from_actuator(layer: &str, e: ActuatorError) -> Self {
        BbError::layer(layer, e.to_string())
    }
}
