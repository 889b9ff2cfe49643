//! Perturbed-attention guidance (Ahn et al., 2024) as diffusers' `PAGMixin` configures it
//! (`pipelines/pag/pag_utils.py`): the self-attention layers a pattern finds in the
//! UNet's module names (`re.search(layer, name)`), and the guidance scale at each
//! timestep.

use std::fmt;

use regex::{Regex, RegexBuilder};

/// Perturbed-attention guidance for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Pag {
    /// The scale of the guidance away from the perturbed prediction (`pag_scale`).
    pub scale: f64,
    /// How fast the scale falls with the timestep (`pag_adaptive_scale`); 0 keeps it.
    pub adaptive_scale: f64,
    /// The self-attention layers perturbed (`pag_applied_layers`).
    pub layers: Vec<PagLayer>,
}

impl Pag {
    /// The scale at `timestep` (diffusers' `_get_pag_scale`): `scale − adaptive_scale ×
    /// (1000 − t)`, not below 0, when adaptive.
    pub fn scale_at(&self, timestep: f64) -> f64 {
        if self.adaptive_scale > 0.0 {
            (self.scale - self.adaptive_scale * (1000.0 - timestep)).max(0.0)
        } else {
            self.scale
        }
    }

    /// Whether the self-attention layer `name`
    /// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1`) is perturbed.
    pub fn perturbs(&self, name: &str) -> bool {
        self.layers.iter().any(|layer| layer.matches(name))
    }

    /// The first layer that finds none of the self-attention layers `names`, if any.
    pub fn unmatched<'l>(&'l self, names: &[String]) -> Option<&'l PagLayer> {
        self.layers.iter().find(|layer| !layer.finds_any(names))
    }
}

/// A pattern for self-attention layer names, as diffusers takes them: a name or part of
/// one (`mid`, `down_blocks.2`, `up_blocks.0.attentions.1.transformer_blocks.0`), or a
/// simple regular expression (`up_blocks.0.attentions.(0|1)`), searched in each name.
#[derive(Debug, Clone)]
pub struct PagLayer {
    pattern: String,
    regex: Regex,
}

/// Longest pattern accepted.
pub const MAX_PATTERN_CHARS: usize = 200;

impl PagLayer {
    /// Checks and compiles `pattern`. Accepted: letters, digits and `_ . | ( ) * + ? ^ $`,
    /// the part of Python's regular expressions that reads the same in this matcher; `(?`
    /// only as `(?:`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.chars().count() > MAX_PATTERN_CHARS {
            return Err(format!("must be at most {MAX_PATTERN_CHARS} characters"));
        }
        // `:` only in `(?:`, which the check below ensures.
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_.|()*+?^$:".contains(c);
        if let Some(c) = pattern.chars().find(|c| !allowed(*c)) {
            return Err(format!(
                "{pattern:?} has {c:?}: a layer is letters, digits and `_ . | ( ) * + ? ^ $`"
            ));
        }
        let groups = pattern.matches("(?:").count();
        if pattern.matches(':').count() != groups || pattern.matches("(?").count() != groups {
            return Err(format!(
                "{pattern:?}: groups other than `(?:` are not accepted"
            ));
        }
        let regex = RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("{pattern:?} is not a valid pattern: {e}"))?;
        Ok(Self {
            pattern: pattern.to_string(),
            regex,
        })
    }

    /// Whether the pattern is found in the self-attention layer `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }

    /// Whether the pattern is found in any of the self-attention layers `names`.
    pub fn finds_any(&self, names: &[String]) -> bool {
        names.iter().any(|name| self.matches(name))
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

impl PartialEq for PagLayer {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl fmt::Display for PagLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// The self-attention layers' names of a UNet whose attentions (`Transformer2DModel`s)
/// are `attentions` (paths, each with its number of transformer blocks), in their order:
/// `<attention>.transformer_blocks.<j>.attn1`.
pub fn self_attention_names<'a>(
    attentions: impl IntoIterator<Item = (&'a str, usize)>,
) -> Vec<String> {
    attentions
        .into_iter()
        .flat_map(|(path, blocks)| {
            (0..blocks).map(move |j| format!("{path}.transformer_blocks.{j}.attn1"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL's self-attention layers: depth 2 in down block 1 and up block 1, 10 in down
    /// block 2, up block 0 and the mid block.
    fn sdxl_names() -> Vec<String> {
        let mut attentions = Vec::new();
        for (block, depth) in [(1, 2), (2, 10)] {
            for a in 0..2 {
                attentions.push((format!("down_blocks.{block}.attentions.{a}"), depth));
            }
        }
        for (block, depth) in [(0, 10), (1, 2)] {
            for a in 0..3 {
                attentions.push((format!("up_blocks.{block}.attentions.{a}"), depth));
            }
        }
        attentions.push(("mid_block.attentions.0".into(), 10));
        self_attention_names(attentions.iter().map(|(p, d)| (p.as_str(), *d)))
    }

    fn found(pattern: &str) -> Vec<String> {
        let layer = PagLayer::parse(pattern).expect("valid layer");
        sdxl_names()
            .into_iter()
            .filter(|n| layer.matches(n))
            .collect()
    }

    #[test]
    fn patterns_find_layers_as_diffusers_searches_them() {
        assert_eq!(sdxl_names().len(), 70);
        assert_eq!(found("mid").len(), 10);
        assert_eq!(found("down").len(), 24);
        assert_eq!(found("up_blocks.1").len(), 6);
        assert_eq!(
            found("up_blocks.0.attentions.1.transformer_blocks.(3|9)"),
            [
                "up_blocks.0.attentions.1.transformer_blocks.3.attn1",
                "up_blocks.0.attentions.1.transformer_blocks.9.attn1"
            ]
        );
        // `.` is any character, as in Python.
        assert_eq!(
            found("mid_block.attentions.0.transformer_blocks.1").len(),
            1
        );
        assert_eq!(found("^mid").len(), 10);
        assert_eq!(found("attn1$").len(), 70);
        assert!(found("down_blocks.0").is_empty());
        assert!(found("down.block_1").is_empty());
        assert_eq!(found("").len(), 70);
    }

    #[test]
    fn patterns_outside_the_shared_syntax_are_refused() {
        for pattern in [
            "mid[0]",
            "a{2}",
            "\\d",
            "(?i)MID",
            "(?P<x>mid)",
            "(?=mid)",
            "mid block",
            "(mid",
            "*mid",
            "mid\u{e9}",
            "mid:",
            "(?::)",
            &"m".repeat(MAX_PATTERN_CHARS + 1),
        ] {
            assert!(
                PagLayer::parse(pattern).is_err(),
                "{pattern:?} was accepted"
            );
        }
        assert!(PagLayer::parse("(?:up|down)_blocks.1").is_ok());
    }

    #[test]
    fn adaptive_scale_falls_with_the_timestep_and_stops_at_zero() {
        let pag = Pag {
            scale: 3.0,
            adaptive_scale: 0.01,
            layers: vec![],
        };
        assert_eq!(pag.scale_at(999.0), 3.0 - 0.01);
        assert_eq!(pag.scale_at(500.0), 0.0);
        let fixed = Pag {
            adaptive_scale: 0.0,
            ..pag
        };
        assert_eq!(fixed.scale_at(1.0), 3.0);
    }
}
