//! A1111's prompt-schedule grammar (its `prompt_parser.schedule_parser`), read as lark
//! reads it: text, emphasis `(..)` `(..:..)` `[..]`, edits `[from:to:when]` and
//! alternations `[a|b]`, with brackets and colons that open no complete construct read
//! as text at the top level.

use std::cell::RefCell;
use std::collections::HashMap;

use super::SyntaxError;

/// Brackets nest at most this deep (the parser descends once per bracket).
pub const MAX_BRACKET_DEPTH: usize = 100;

/// A parsed prompt: text, and what changes with the step.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Node {
    Text(String),
    /// `[before:after:when]`; `before` absent in `[after:when]`.
    Scheduled {
        before: Option<Vec<Node>>,
        after: Vec<Node>,
        when: String,
    },
    /// `[a|b|...]`.
    Alternate(Vec<Vec<Node>>),
}

/// The nodes of `chars` as A1111's grammar reads them, or `None` where it cannot parse
/// them.
///
/// The grammar is ambiguous: brackets and colons that open no complete construct are
/// text, and so can the brackets of a complete construct be. A1111 parses with lark,
/// whose Earley parser reads a construct as a construct where a prompt ends at its
/// closing bracket, as text or not (by the order it found the readings in) where
/// brackets read as text follow it. An edit in that place is refused rather than read
/// one way where A1111 may read it the other (see [`Parser::edit_at_risk`]).
pub(super) fn parse(chars: &[char]) -> Result<Option<Vec<Node>>, SyntaxError> {
    let parser = Parser {
        chars,
        accepted: RefCell::new(Vec::new()),
    };
    let Some(nodes) = parser.parse()? else {
        return Ok(None);
    };
    if let Some(edit) = parser.edit_at_risk() {
        let text: String = chars[edit.open..=edit.close].iter().collect();
        return Err(SyntaxError::Unsupported(format!(
            "has the edit `{text}` before brackets or colons read as text, which A1111's parser reads as an edit or as text depending on how many there are: put a space or text after the edit, or escape the stray brackets"
        )));
    }
    Ok(Some(nodes))
}

/// What a bracket pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Emphasis,
    Edit,
    Alternation,
}

/// A construct the parse accepted, and where its brackets are.
#[derive(Debug, Clone, Copy)]
struct Construct {
    kind: Kind,
    open: usize,
    close: usize,
}

/// A parser for A1111's schedule grammar: at the top level a bracket or colon that
/// opens no complete construct is text; a `|` outside an alternation or a backslash
/// escaping nothing fails the parse (A1111 then reads the prompt as it is).
struct Parser<'a> {
    chars: &'a [char],
    /// The constructs accepted so far.
    accepted: RefCell<Vec<Construct>>,
}

impl Parser<'_> {
    /// The prompt's nodes, or `None` where A1111's grammar cannot parse it.
    fn parse(&self) -> Result<Option<Vec<Node>>, SyntaxError> {
        let mut nodes = Vec::new();
        let mut pos = 0;
        loop {
            let (mut part, next) = self.prompt(pos, 0)?;
            nodes.append(&mut part);
            pos = next;
            match self.chars.get(pos) {
                None => return Ok(Some(nodes)),
                Some(&c @ ('[' | ']' | '(' | ')' | ':')) => {
                    push_text(&mut nodes, &c.to_string());
                    pos += 1;
                }
                Some(_) => return Ok(None),
            }
        }
    }

    /// The first edit lark may read as text: one followed, past the closing brackets
    /// and colons of the constructs around it and past whole constructs, by a bracket
    /// or colon read as text. One followed so by text, by the end of the prompt, or
    /// inside an alternation (whose `|` cannot be text) is read as an edit.
    fn edit_at_risk(&self) -> Option<Construct> {
        let accepted = self.accepted.borrow();
        let by_open: HashMap<usize, &Construct> = accepted.iter().map(|c| (c.open, c)).collect();
        let by_close: HashMap<usize, &Construct> = accepted.iter().map(|c| (c.close, c)).collect();
        let around = |pos: usize| {
            accepted
                .iter()
                .filter(|c| c.open < pos && pos < c.close)
                .min_by_key(|c| c.close - c.open)
        };
        let at_risk = |edit: &Construct| {
            let mut pos = edit.close + 1;
            loop {
                let Some(&c) = self.chars.get(pos) else {
                    return false;
                };
                if let Some(closing) = by_close.get(&pos) {
                    if closing.kind == Kind::Alternation {
                        return false;
                    }
                    pos += 1;
                } else if let Some(next) = by_open.get(&pos) {
                    pos = next.close + 1;
                } else if let Some(outer) = around(pos).filter(|_| matches!(c, ':' | '|')) {
                    // A colon or bar of a construct around the edit: on to its end.
                    if outer.kind == Kind::Alternation {
                        return false;
                    }
                    pos = outer.close;
                } else {
                    return matches!(c, '[' | ']' | '(' | ')' | ':');
                }
            }
        };
        let inside_alternation = |edit: &Construct| {
            accepted
                .iter()
                .any(|c| c.kind == Kind::Alternation && c.open < edit.open && edit.close < c.close)
        };
        accepted
            .iter()
            .filter(|c| c.kind == Kind::Edit && !inside_alternation(c))
            .find(|c| at_risk(c))
            .copied()
    }

    /// Records an accepted construct.
    fn accept(&self, kind: Kind, open: usize, close: usize) {
        self.accepted
            .borrow_mut()
            .push(Construct { kind, open, close });
    }

    /// Forgets the constructs accepted inside one that failed.
    fn reject(&self, mark: usize) -> Option<(Vec<Node>, usize)> {
        self.accepted.borrow_mut().truncate(mark);
        None
    }

    /// The grammar's `prompt` from `pos`: text and complete constructs, up to the first
    /// character that continues none.
    fn prompt(&self, mut pos: usize, depth: usize) -> Result<(Vec<Node>, usize), SyntaxError> {
        if depth > MAX_BRACKET_DEPTH {
            return Err(SyntaxError::TooComplex(format!(
                "nests brackets more than {MAX_BRACKET_DEPTH} deep"
            )));
        }
        let mut nodes = Vec::new();
        while let Some(&c) = self.chars.get(pos) {
            let construct = match c {
                '\\' => match self.chars.get(pos + 1) {
                    Some(&escaped) if escaped != '\n' => {
                        push_text(&mut nodes, &format!("\\{escaped}"));
                        pos += 2;
                        continue;
                    }
                    _ => None,
                },
                '(' => self.round(pos, depth)?,
                '[' => self.square(pos, depth)?,
                ')' | ']' | ':' | '|' => None,
                _ => {
                    push_text(&mut nodes, &c.to_string());
                    pos += 1;
                    continue;
                }
            };
            let Some((part, next)) = construct else {
                break;
            };
            for node in part {
                match node {
                    Node::Text(text) => push_text(&mut nodes, &text),
                    other => nodes.push(other),
                }
            }
            pos = next;
        }
        Ok((nodes, pos))
    }

    /// The character at `pos`.
    fn at(&self, pos: usize) -> Option<char> {
        self.chars.get(pos).copied()
    }

    /// `(prompt)` or `(prompt:prompt)` at `pos`: kept as text around its contents.
    fn round(&self, pos: usize, depth: usize) -> Result<Option<(Vec<Node>, usize)>, SyntaxError> {
        let mark = self.accepted.borrow().len();
        let (inner, mut close) = self.prompt(pos + 1, depth + 1)?;
        let mut nodes = vec![Node::Text("(".into())];
        nodes.extend(inner);
        if self.at(close) == Some(':') {
            let (second, after) = self.prompt(close + 1, depth + 1)?;
            nodes.push(Node::Text(":".into()));
            nodes.extend(second);
            close = after;
        }
        if self.at(close) != Some(')') {
            return Ok(self.reject(mark));
        }
        nodes.push(Node::Text(")".into()));
        self.accept(Kind::Emphasis, pos, close);
        Ok(Some((nodes, close + 1)))
    }

    /// `[prompt]`, `[a|b|...]`, `[to:when]` or `[from:to:when]` at `pos`.
    fn square(&self, pos: usize, depth: usize) -> Result<Option<(Vec<Node>, usize)>, SyntaxError> {
        let mark = self.accepted.borrow().len();
        let (first, next) = self.prompt(pos + 1, depth + 1)?;
        let parsed = match self.at(next) {
            Some(']') => {
                let mut nodes = vec![Node::Text("[".into())];
                nodes.extend(first);
                nodes.push(Node::Text("]".into()));
                self.accept(Kind::Emphasis, pos, next);
                Some((nodes, next + 1))
            }
            Some('|') => self.alternate(first, next, depth)?,
            Some(':') => self.edit(first, next, depth)?,
            _ => None,
        };
        Ok(match parsed {
            Some((nodes, end)) => {
                if let Some(Node::Scheduled { .. }) = nodes.first() {
                    self.accept(Kind::Edit, pos, end - 1);
                } else if let Some(Node::Alternate(_)) = nodes.first() {
                    self.accept(Kind::Alternation, pos, end - 1);
                }
                Some((nodes, end))
            }
            None => self.reject(mark),
        })
    }

    /// The rest of `[to:when]` or `[from:to:when]` after `first` and the `:` at `colon`.
    fn edit(
        &self,
        first: Vec<Node>,
        colon: usize,
        depth: usize,
    ) -> Result<Option<(Vec<Node>, usize)>, SyntaxError> {
        if let Some((when, end)) = self.when(colon + 1) {
            let node = Node::Scheduled {
                before: None,
                after: first,
                when,
            };
            return Ok(Some((vec![node], end)));
        }
        let (second, colon) = self.prompt(colon + 1, depth + 1)?;
        if self.at(colon) != Some(':') {
            return Ok(None);
        }
        Ok(self.when(colon + 1).map(|(when, end)| {
            let node = Node::Scheduled {
                before: Some(first),
                after: second,
                when,
            };
            (vec![node], end)
        }))
    }

    /// The alternatives after `first`, from the `|` at `pos` to the closing bracket.
    fn alternate(
        &self,
        first: Vec<Node>,
        mut pos: usize,
        depth: usize,
    ) -> Result<Option<(Vec<Node>, usize)>, SyntaxError> {
        let mut options = vec![first];
        while self.at(pos) == Some('|') {
            let (option, next) = self.prompt(pos + 1, depth + 1)?;
            options.push(option);
            pos = next;
        }
        if self.at(pos) != Some(']') {
            return Ok(None);
        }
        Ok(Some((vec![Node::Alternate(options)], pos + 1)))
    }

    /// `[WHITESPACE] NUMBER [WHITESPACE] "]"` from `pos`: the number as written, and
    /// where the bracket ends.
    fn when(&self, pos: usize) -> Option<(String, usize)> {
        let close = pos + self.chars.get(pos..)?.iter().position(|&c| c == ']')?;
        let inside: String = self.chars[pos..close].iter().collect();
        let number = inside.trim_matches(is_py_space);
        is_signed_number(number).then(|| (number.to_string(), close + 1))
    }
}

fn push_text(nodes: &mut Vec<Node>, text: &str) {
    match nodes.last_mut() {
        Some(Node::Text(last)) => last.push_str(text),
        _ => nodes.push(Node::Text(text.to_string())),
    }
}

/// Python's `\s` (`str.isspace`).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// lark's `SIGNED_NUMBER`: `[+-]` then an integer, a decimal (`1.`, `.5`, `1.5`) or
/// either with an exponent (`1e3`, `1.5E-2`), in ASCII digits.
pub(super) fn is_signed_number(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            (digits(whole) && (fraction.is_empty() || digits(fraction)))
                || (whole.is_empty() && digits(fraction))
        }
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}
