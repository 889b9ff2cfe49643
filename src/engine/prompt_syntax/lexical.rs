//! The character-level rules under compel's grammar: which characters make words and
//! whitespace, how fragments unescape, how Python's `float()` and pyparsing's quoted
//! strings read text.

/// pyparsing's default whitespace, skipped before every element.
pub(super) const SKIPPED: &[char] = &[' ', '\t', '\n', '\r'];
/// Python's `string.whitespace`, which words never contain.
pub(super) const STRING_WHITESPACE: &[char] = &[' ', '\t', '\n', '\r', '\x0b', '\x0c'];
/// The characters with a meaning in compel's syntax (escaped with a backslash in words).
pub(super) const SYNTAX: &[char] = &['(', ')', '"', ',', '.', '+', '-', '='];

/// compel's `Fragment`: `\(`, `\)` and `\"` unescaped, in that order.
pub(super) fn fragment_text(text: &str) -> String {
    if text.contains("\\\"") || text.contains("\\(") || text.contains("\\)") {
        text.replace("\\(", "(")
            .replace("\\)", ")")
            .replace("\\\"", "\"")
    } else {
        text.to_string()
    }
}

/// A character of a word: neither whitespace nor syntax.
pub(super) fn word_char(c: char) -> bool {
    !STRING_WHITESPACE.contains(&c) && !SYNTAX.contains(&c)
}

/// Python's `str.isspace`.
pub(super) fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `float()` of a number or keyword token (digits, `.`, `_`, `-`, `+`, letters).
pub(super) fn python_float(text: &str) -> Option<f64> {
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let lower = body.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        let value = if lower == "nan" {
            f64::NAN
        } else {
            f64::INFINITY
        };
        return Some(if text.starts_with('-') { -value } else { value });
    }
    // Underscores only between digits.
    let chars: Vec<char> = text.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == '_' {
            let digit = |j: Option<&char>| j.is_some_and(char::is_ascii_digit);
            if !digit(i.checked_sub(1).and_then(|j| chars.get(j))) || !digit(chars.get(i + 1)) {
                return None;
            }
        }
    }
    let cleaned: String = chars.iter().filter(|c| **c != '_').collect();
    let valid = cleaned
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'));
    if !valid || !cleaned.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    cleaned.parse().ok()
}

/// pyparsing's unquoting with whitespace escapes: `\t`, `\n`, `\f`, `\r` and the numeric
/// escapes `\ooo`, `\0`, `\xhh`, `\uhhhh` become characters; anything else stays.
pub(super) fn unquote(inner: &str) -> String {
    let s: Vec<char> = inner.chars().collect();
    let mut out = String::with_capacity(inner.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == '\\' {
            if let Some((len, c)) = escape_at(&s[i + 1..]) {
                out.push(c);
                i += 1 + len;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The escape after a backslash: its length and character.
fn escape_at(rest: &[char]) -> Option<(usize, char)> {
    let first = *rest.first()?;
    let white = match first {
        't' => Some('\t'),
        'n' => Some('\n'),
        'f' => Some('\x0c'),
        'r' => Some('\r'),
        _ => None,
    };
    if let Some(c) = white {
        return Some((1, c));
    }
    let take = |n: usize, radix: u32| -> Option<u32> {
        let digits: String = rest.get(..n)?.iter().collect();
        if digits.chars().all(|c| c.is_digit(radix)) {
            u32::from_str_radix(&digits, radix).ok()
        } else {
            None
        }
    };
    if let Some(v) = take(3, 8) {
        return char::from_u32(v).map(|c| (3, c));
    }
    if first == '0' {
        return Some((1, '\0'));
    }
    let hex = |n: usize| {
        let digits = rest.get(1..=n)?;
        digits
            .iter()
            .all(char::is_ascii_hexdigit)
            .then(|| u32::from_str_radix(&digits.iter().collect::<String>(), 16).ok())
            .flatten()
            .and_then(char::from_u32)
            .map(|c| (n + 1, c))
    };
    match first {
        'x' => hex(2),
        'u' => hex(4),
        _ => None,
    }
}
