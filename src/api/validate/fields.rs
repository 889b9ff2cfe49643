//! Checks shared by the converters: violations with their proto paths, ranges that NaN
//! and infinities never pass, enums, model names.

use crate::api::status::ApiError;
use crate::engine::registry::check_name;
use crate::proto::v1 as pb;

/// Whether a preprocessor parameter that only `owner` reads may be set for `kind`; if
/// not, the violation naming `field` and its preprocessor (an unknown `kind` is named
/// under its own field, so it passes here).
pub fn read_by(
    v: &mut Violations,
    field: &str,
    kind: Option<pb::Preprocessor>,
    owner: pb::Preprocessor,
) -> bool {
    read_by_any(v, field, kind, &[owner])
}

/// [`read_by`] for a parameter that several preprocessors (`owners`) read.
pub fn read_by_any(
    v: &mut Violations,
    field: &str,
    kind: Option<pb::Preprocessor>,
    owners: &[pb::Preprocessor],
) -> bool {
    if kind.is_some_and(|k| !owners.contains(&k)) {
        let names: Vec<&str> = owners.iter().map(|o| o.as_str_name()).collect();
        v.add(field, format!("applies to {} only", names.join(" and ")));
        return false;
    }
    true
}

/// Seeds are below 2^53 so that JSON clients (JavaScript, C# doubles) keep them exact.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// The bad fields of a request: (proto field path, description naming the field).
#[derive(Debug, Default)]
pub struct Violations(pub Vec<(String, String)>);

impl Violations {
    /// Records a bad field; `description` follows the field's name ("must be ...").
    /// A violation already recorded (a text several passes read, checked for each) is
    /// recorded once.
    pub fn add(&mut self, field: impl Into<String>, description: impl AsRef<str>) {
        let field = field.into();
        let description = format!("`{field}` {}", description.as_ref());
        let violation = (field, description);
        if !self.0.contains(&violation) {
            self.0.push(violation);
        }
    }

    /// Whether `field` is already named: a rule that reads its value (a default stands in
    /// for a bad one) then says nothing more of it.
    pub fn names(&self, field: &str) -> bool {
        self.0.iter().any(|(named, _)| named == field)
    }

    /// INVALID_ARGUMENT naming every bad field, if there is one.
    pub fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(self.0))
        }
    }
}

/// The float a client meant: proto floats are f32, and 0.7f32 widened is 0.69999998,
/// which truncates differently (int(steps * strength)) than the 0.7 diffusers gets.
pub fn decimal(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

/// One end of a range.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// The value itself is in range.
    Inclusive(f64),
    /// The value itself is out of range.
    Exclusive(f64),
}

/// A range of floats.
#[derive(Debug, Clone, Copy)]
pub struct Range(pub Bound, pub Bound);

impl Range {
    /// [min, max].
    pub const fn closed(min: f64, max: f64) -> Self {
        Self(Bound::Inclusive(min), Bound::Inclusive(max))
    }

    /// (min, max).
    pub const fn open(min: f64, max: f64) -> Self {
        Self(Bound::Exclusive(min), Bound::Exclusive(max))
    }

    /// (min, max].
    pub const fn open_closed(min: f64, max: f64) -> Self {
        Self(Bound::Exclusive(min), Bound::Inclusive(max))
    }

    /// [min, max).
    pub const fn closed_open(min: f64, max: f64) -> Self {
        Self(Bound::Inclusive(min), Bound::Exclusive(max))
    }

    /// Whether `value` is in range: NaN and infinities never are.
    pub fn contains(self, value: f64) -> bool {
        let above = match self.0 {
            Bound::Inclusive(min) => value >= min,
            Bound::Exclusive(min) => value > min,
        };
        let below = match self.1 {
            Bound::Inclusive(max) => value <= max,
            Bound::Exclusive(max) => value < max,
        };
        value.is_finite() && above && below
    }

    fn describe(self) -> String {
        match (self.0, self.1) {
            (Bound::Inclusive(a), Bound::Inclusive(b)) => format!("between {a} and {b}"),
            (Bound::Exclusive(a), Bound::Exclusive(b)) => format!("strictly between {a} and {b}"),
            (Bound::Exclusive(a), Bound::Inclusive(b)) => format!("in ({a}, {b}]"),
            (Bound::Inclusive(a), Bound::Exclusive(b)) => format!("in [{a}, {b})"),
        }
    }
}

/// The seed field `field` of image 0 of `num_images` whose image i uses seed + i (`last`:
/// the last image's i), every image's below 2^53 so that JSON clients keep it exact;
/// absent, `drawn` brought into that range.
pub fn first_seed(
    v: &mut Violations,
    field: &str,
    asked: Option<u64>,
    (num_images, last): (u32, u64),
    drawn: u64,
) -> u64 {
    match asked {
        Some(seed) if seed > MAX_SEED => {
            v.add(field, format!("must be below 2^53, got {seed}"));
            0
        }
        Some(seed) if seed + last > MAX_SEED => {
            // Image i's seed is seed + i, which its metadata records and a replay sends.
            v.add(
                field,
                format!("must be at most 2^53 - {num_images} with {num_images} images (the last image's seed is seed + {last}), got {seed}"),
            );
            0
        }
        Some(seed) => seed,
        None => drawn % (MAX_SEED - last + 1),
    }
}

/// Whether `value` is an image side `field` may have (a multiple of 8 in [64, max]);
/// a violation when not.
pub fn image_side(v: &mut Violations, field: &str, value: u32, max: u32) -> bool {
    let fits = value.is_multiple_of(8) && (64..=max).contains(&value);
    if !fits {
        v.add(
            field,
            format!("must be a multiple of 8 between 64 and {max}, got {value}"),
        );
    }
    fits
}

/// A float field in `range`, as the decimal the client wrote; `None` (and a violation)
/// when it is out of range, NaN or infinite. The range holds the decimal, not the
/// float32's binary value: 0.01 sent as a float32 (0.00999999977...) is 0.01.
pub fn float(v: &mut Violations, field: &str, value: f32, range: Range) -> Option<f64> {
    let written = decimal(value);
    if range.contains(written) {
        return Some(written);
    }
    let finite = if value.is_finite() {
        ""
    } else {
        "a finite number "
    };
    v.add(
        field,
        format!("must be {finite}{}, got {value}", range.describe()),
    );
    None
}

/// An optional float field: its value, or `default` when it is absent (or bad, with a
/// violation).
pub fn optional_float(
    v: &mut Violations,
    field: &str,
    value: Option<f32>,
    range: Range,
    default: f64,
) -> f64 {
    value
        .and_then(|x| float(v, field, x, range))
        .unwrap_or(default)
}

/// An integer field at most `max`.
pub fn at_most(v: &mut Violations, field: &str, value: u32, max: u32) {
    if value > max {
        v.add(field, format!("must be at most {max}, got {value}"));
    }
}

/// An enum field's value, or a violation for a number the contract does not define.
pub fn enum_value<E: TryFrom<i32>>(v: &mut Violations, field: &str, value: i32) -> Option<E> {
    match E::try_from(value) {
        Ok(e) => Some(e),
        Err(_) => {
            v.add(field, format!("has an unknown enum value {value}"));
            None
        }
    }
}

/// Whether `name` may name a model; a violation when it may not.
pub fn model_name(v: &mut Violations, field: &str, name: &str) -> bool {
    match check_name(name) {
        Ok(()) => true,
        Err(e) => {
            v.add(field, format!("is not a valid model name ({})", e.reason()));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_range_holds_nan_or_infinities() {
        for range in [
            Range::closed(0.0, 1.0),
            Range::open(0.0, 1.0),
            Range::closed(-2.0, 2.0),
            Range::closed_open(0.0, 1.0),
        ] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                assert!(!range.contains(bad), "{range:?} holds {bad}");
            }
        }
        assert!(Range::closed(0.0, 1.0).contains(1.0));
        assert!(!Range::open_closed(0.0, 1.0).contains(0.0));
    }

    #[test]
    fn violations_name_the_field_and_the_value() {
        let mut v = Violations::default();
        assert_eq!(
            float(&mut v, "spec.eta", f32::NAN, Range::closed(0.0, 1.0)),
            None
        );
        assert_eq!(
            float(&mut v, "spec.x", 0.7, Range::closed(0.0, 1.0)),
            Some(0.7)
        );
        assert_eq!(v.0.len(), 1);
        assert_eq!(v.0[0].0, "spec.eta");
        assert!(v.0[0]
            .1
            .starts_with("`spec.eta` must be a finite number between 0 and 1"));
    }

    #[test]
    fn bounds_hold_the_decimal_a_client_wrote() {
        let mut v = Violations::default();
        for (bound, above, below) in [
            (0.01, 0.010_001_f32, 0.009_999_f32),
            (0.1, 0.100_001, 0.099_999),
        ] {
            assert!(
                f64::from(bound as f32) != bound,
                "{bound} is exact in float32"
            );
            let range = Range::closed(bound, 64.0);
            assert_eq!(float(&mut v, "x", bound as f32, range), Some(bound));
            assert!(float(&mut v, "x", above, range).is_some());
            assert_eq!(float(&mut v, "x", below, range), None);
            let open = Range::open(bound, 64.0);
            assert_eq!(float(&mut v, "x", bound as f32, open), None);
        }
        assert_eq!(v.0.len(), 4);
        let next = f32::from_bits(64.0_f32.to_bits() + 1);
        assert_eq!(float(&mut v, "x", next, Range::closed(0.01, 64.0)), None);
    }
}
