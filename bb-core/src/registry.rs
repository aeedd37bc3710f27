//! The kinds registered for each plugin trait.
//!
//! typetag keeps its registry private, so the list is read back from the error it gives
//! for a kind that cannot exist — exactly the list a user sees when a config names an
//! unknown kind, and so a test over it catches a plugin that failed to link.

use crate::{ActivityTracker, BudgetPolicy};

fn parse_expected(msg: &str) -> Vec<String> {
    let tail = match msg.find("expected") {
        Some(i) => &msg[i..],
        None => return Vec::new(),
    };
    let mut kinds: Vec<String> = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    kinds.sort();
    kinds
}

const PROBE: &str = r#"{"kind": "\u0000no such kind"}"#;

/// Every registered [`BudgetPolicy`] kind, sorted.
pub fn registered_policies() -> Vec<String> {
    match serde_json::from_str::<Box<dyn BudgetPolicy>>(PROBE) {
        Err(e) => parse_expected(&e.to_string()),
        Ok(_) => Vec::new(),
    }
}

/// Every registered [`ActivityTracker`] kind, sorted.
pub fn registered_trackers() -> Vec<String> {
    match serde_json::from_str::<Box<dyn ActivityTracker>>(PROBE) {
        Err(e) => parse_expected(&e.to_string()),
        Ok(_) => Vec::new(),
    }
}
