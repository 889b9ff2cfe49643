//! Checks of the values in model configs, run when a model loads, so that a config no
//! model could have (zero heads, zero training timesteps, widths that do not divide) is
//! refused naming its file and key instead of failing every job with an arithmetic
//! error.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::engine::error::{EngineError, Result};
use crate::engine::files::read_json;

/// A config whose values can be checked.
pub trait CheckedConfig {
    /// diffusers keys this implementation reads no further, with the JSON values it
    /// computes (any one of them; for a list, each entry): another value would change
    /// the model's output unseen, so it is refused. Absent keys are diffusers' defaults.
    const FIXED: &'static [(&'static str, &'static [&'static str])] = &[];

    /// Records every impossible value.
    fn check(&self, check: &mut ConfigCheck);
}

/// Reads the JSON config at `path` and checks its values.
pub fn read_config<T: DeserializeOwned + CheckedConfig>(path: &Path) -> Result<T> {
    let value: Value = read_json(path)?;
    config_from_value(path, &value)
}

/// The config `value` (read from `path`), checked.
pub fn config_from_value<T: DeserializeOwned + CheckedConfig>(
    path: &Path,
    value: &Value,
) -> Result<T> {
    let mut check = ConfigCheck::default();
    check.fixed(value, T::FIXED);
    let config = T::deserialize(value).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    config.check(&mut check);
    check.finish(path)?;
    Ok(config)
}

/// Whether two JSON values are the same (numbers by value: 1 and 1.0 are).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Checks `config`, read from `path` (a config file, or a single file that embeds it).
pub fn check_config(config: &impl CheckedConfig, path: &Path) -> Result<()> {
    let mut check = ConfigCheck::default();
    config.check(&mut check);
    check.finish(path)
}

/// The problems found in one config.
#[derive(Default)]
pub struct ConfigCheck {
    problems: Vec<String>,
}

impl ConfigCheck {
    /// Records a problem with `key`.
    pub fn problem(&mut self, key: &str, what: impl std::fmt::Display) {
        self.problems.push(format!("`{key}` {what}"));
    }

    /// Every key of `fixed` present in `config` must have one of its values.
    fn fixed(&mut self, config: &Value, fixed: &[(&str, &[&str])]) {
        for (key, allowed) in fixed {
            let Some(value) = config.get(key) else {
                continue;
            };
            let allowed: Vec<Value> = allowed
                .iter()
                .filter_map(|text| serde_json::from_str(text).ok())
                .collect();
            let fits = |v: &Value| allowed.iter().any(|a| same(a, v));
            let fine = match value {
                Value::Array(items) => items.iter().all(fits),
                other => fits(other),
            };
            if !fine {
                let known: Vec<String> = allowed.iter().map(Value::to_string).collect();
                self.problem(
                    key,
                    format_args!("is {value}; sdxld computes only {}", known.join(" or ")),
                );
            }
        }
    }

    /// Records a problem whose text names its key.
    pub fn message(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    /// `value` must be at least 1.
    pub fn positive(&mut self, key: &str, value: i64) {
        if value < 1 {
            self.problem(key, format_args!("is {value}; it must be at least 1"));
        }
    }

    /// Every value must be at least 1.
    pub fn all_positive(&mut self, key: &str, values: &[i64]) {
        if let Some(bad) = values.iter().find(|&&v| v < 1) {
            self.problem(
                key,
                format_args!("holds {bad}; every value must be at least 1"),
            );
        }
    }

    /// `value` must be at least 0.
    pub fn not_negative(&mut self, key: &str, value: i64) {
        if value < 0 {
            self.problem(key, format_args!("is {value}; it must not be negative"));
        }
    }

    /// `value` must be a finite number above 0.
    pub fn positive_number(&mut self, key: &str, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            self.problem(
                key,
                format_args!("is {value}; it must be a finite number above 0"),
            );
        }
    }

    /// `value` must be a finite number.
    pub fn finite(&mut self, key: &str, value: f64) {
        if !value.is_finite() {
            self.problem(key, format_args!("is {value}; it must be a finite number"));
        }
    }

    /// `value` (of `key`) must divide into `parts` (of `parts_key`) evenly; a
    /// non-positive `parts` is reported by its own check.
    pub fn divisible(&mut self, key: &str, value: i64, parts_key: &str, parts: i64) {
        if parts >= 1 && value >= 1 && value % parts != 0 {
            self.problem(
                key,
                format_args!("is {value}, which `{parts_key}` ({parts}) does not divide"),
            );
        }
    }

    /// `value` must be one of `known`.
    pub fn one_of(&mut self, key: &str, value: &str, known: &[&str]) {
        if !known.contains(&value) {
            self.problem(
                key,
                format_args!("is {value:?}; sdxld knows {}", known.join(", ")),
            );
        }
    }

    /// A list must have `expected` entries.
    pub fn length(&mut self, key: &str, actual: usize, expected: usize, because: &str) {
        if actual != expected {
            self.problem(
                key,
                format_args!("has {actual} entries; {because} needs {expected}"),
            );
        }
    }

    /// The problems found, as one error naming `path`.
    pub fn finish(self, path: &Path) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        Err(EngineError::Config {
            path: path.to_path_buf(),
            message: self.problems.join("; "),
        })
    }
}
