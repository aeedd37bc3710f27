use crate::BbError;
use serde::{Deserialize, Serialize};

/// When refreshes happen. Steps count completed optimizer updates, from 1.
///
/// Refreshes run at `warmup, warmup + refresh_every, ...` (the first at `refresh_every` when
/// there is no warm-up) and stop after `freeze_step`, if given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Dense warm-up steps; default 10 % of `total_steps` (0 if that is unknown).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Steps between refreshes (default 25).
    #[serde(default = "default_refresh")]
    pub refresh_every: u64,
    /// Last step at which a refresh may run (masks are frozen afterwards).
    #[serde(default)]
    pub freeze_step: Option<u64>,
    /// Length of training, used for the warm-up default and by time-dependent policies
    /// (GMP, RigL, SET).
    #[serde(default)]
    pub total_steps: Option<u64>,
}

fn default_refresh() -> u64 {
    25
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            warmup_steps: None,
            refresh_every: default_refresh(),
            freeze_step: None,
            total_steps: None,
        }
    }
}

impl Schedule {
    /// The effective warm-up.
    pub fn warmup(&self) -> u64 {
        self.warmup_steps
            .unwrap_or_else(|| self.total_steps.map_or(0, |t| t / 10))
    }

    /// Whether a refresh runs after step `step`.
    pub fn is_refresh(&self, step: u64) -> bool {
        let w = self.warmup();
        let first = if w == 0 { self.refresh_every } else { w };
        step >= first
            && (step - w).is_multiple_of(self.refresh_every)
            && self.freeze_step.is_none_or(|f| step <= f)
    }

    /// Checks the fields.
    pub fn validate(&self) -> Result<(), BbError> {
        if self.refresh_every == 0 {
            return Err(BbError::config("schedule.refresh_every", "must be >= 1"));
        }
        if let (Some(t), Some(w)) = (self.total_steps, self.warmup_steps) {
            if w > t {
                return Err(BbError::config(
                    "schedule.warmup_steps",
                    format!("{w} exceeds total_steps {t}"),
                ));
            }
        }
        if self.total_steps == Some(0) {
            return Err(BbError::config("schedule.total_steps", "must be >= 1"));
        }
        Ok(())
    }
}
