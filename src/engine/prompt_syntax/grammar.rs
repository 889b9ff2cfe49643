//! compel's prompt grammar (`compel/prompt_parser.py`, `build_parser_syntax`), ported
//! from its pyparsing expressions: ordered choice without backtracking into a choice
//! once taken, every element skipping the spaces, tabs and line breaks before it except
//! inside a word, and the same fallbacks (text that is not valid syntax at the top level
//! is a plain word, parentheses included).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::lexical::{
    fragment_text, py_space, python_float, unquote, word_char, SKIPPED, STRING_WHITESPACE, SYNTAX,
};
use super::{SyntaxError, MAX_NESTING};

/// A node of the parse tree, before flattening.
#[derive(Debug, Clone)]
pub(super) enum Node {
    /// Text of weight 1 (escapes already resolved once, as compel's `Fragment` does).
    Text(String),
    /// Children whose weights are multiplied by the factor.
    Attention(f64, Vec<Node>),
    /// `.swap()`: cross-attention control.
    Swap,
    /// `withLora()`/`useLora()`.
    Lora,
}

/// One part of the top level: a prompt, or a blend of prompts.
#[derive(Debug, Clone)]
pub(super) enum TopPart {
    Prompt(Vec<Node>),
    Blend {
        prompts: Vec<Vec<Node>>,
        weights: Vec<f64>,
        normalize: bool,
    },
}

/// The top level: parts and their conjunction weights (one per part, or empty for 1).
pub(super) struct Tree {
    pub parts: Vec<TopPart>,
    pub weights: Vec<f64>,
}

type Matched<T> = Result<Option<(usize, T)>, SyntaxError>;
/// A memoised parse: the end and the nodes, or no match.
type Memo = HashMap<(usize, u8), Option<(usize, Vec<Node>)>>;

/// Which fragment list a parenthesised or quoted fragment holds.
#[derive(Clone, Copy, PartialEq)]
#[repr(u8)]
enum Fragments {
    /// `fragment_including_commas_or_periods`.
    WithPunctuation,
    /// `fragment_excluding_commas` (a swap's replacement).
    WithoutPunctuation,
    /// `prompt` (a quoted prompt of a blend or a conjunction).
    Prompt,
}

pub(super) struct Parser {
    s: Vec<char>,
    /// Parenthesised and quoted fragments by (position, kind): pyparsing re-parses them
    /// for every alternative that starts with one, exponential in the nesting depth.
    memo: RefCell<Memo>,
    /// Parentheses, quotes and operator lists open around the position being parsed
    /// (bounded: each level is a few stack frames).
    depth: Cell<usize>,
}

impl Parser {
    pub(super) fn new(text: &str) -> Self {
        Self::nested_in(text, 0)
    }

    fn nested_in(text: &str, depth: usize) -> Self {
        Self {
            s: text.chars().collect(),
            memo: RefCell::new(HashMap::new()),
            depth: Cell::new(depth),
        }
    }

    /// `parse` one level deeper, refused beyond [`MAX_NESTING`] levels.
    fn deeper<T>(&self, parse: impl FnOnce() -> Matched<T>) -> Matched<T> {
        let depth = self.depth.get() + 1;
        if depth > MAX_NESTING {
            return Err(SyntaxError::TooComplex(format!(
                "nests parentheses, quotes or operators more than {MAX_NESTING} deep"
            )));
        }
        self.depth.set(depth);
        let found = parse();
        self.depth.set(depth - 1);
        found
    }

    fn memoized(
        &self,
        p: usize,
        key: u8,
        parse: impl FnOnce() -> Matched<Vec<Node>>,
    ) -> Matched<Vec<Node>> {
        if let Some(found) = self.memo.borrow().get(&(p, key)) {
            return Ok(found.clone());
        }
        let found = parse()?;
        self.memo.borrow_mut().insert((p, key), found.clone());
        Ok(found)
    }

    fn at(&self, p: usize) -> Option<char> {
        self.s.get(p).copied()
    }

    fn skip(&self, mut p: usize) -> usize {
        while self.at(p).is_some_and(|c| SKIPPED.contains(&c)) {
            p += 1;
        }
        p
    }

    fn literal(&self, p: usize, lit: &str) -> Option<usize> {
        let q = self.skip(p);
        let n = lit.chars().count();
        let matches = self.s.len() >= q + n && self.s[q..q + n].iter().copied().eq(lit.chars());
        matches.then_some(q + n)
    }

    /// The whole text: `conjunction`, as `parse_string` runs it (the explicit form may
    /// leave text after it unread).
    pub(super) fn parse(&self) -> Result<Tree, SyntaxError> {
        if let Some((_, tree)) = self.explicit_conjunction(0)? {
            return Ok(tree);
        }
        let parts = self
            .implicit_conjunction()?
            .ok_or_else(|| SyntaxError::Unparsable("compel cannot parse it".into()))?;
        Ok(Tree {
            weights: Vec::new(),
            parts,
        })
    }

    fn implicit_conjunction(&self) -> Result<Option<Vec<TopPart>>, SyntaxError> {
        let mut parts = Vec::new();
        let mut p = 0;
        if let Some((q, loras)) = self.lora_run(p)? {
            parts.push(TopPart::Prompt(loras));
            p = q;
        }
        if let Some((q, blend)) = self.blend(p)? {
            parts.push(blend);
            p = q;
        } else {
            let (q, nodes) = self.fragments(p, Fragments::Prompt)?;
            parts.push(TopPart::Prompt(nodes));
            p = q;
        }
        if let Some((q, loras)) = self.lora_run(p)? {
            parts.push(TopPart::Prompt(loras));
            p = q;
        }
        Ok((self.skip(p) == self.s.len()).then_some(parts))
    }

    fn lora_run(&self, mut p: usize) -> Matched<Vec<Node>> {
        let mut nodes = Vec::new();
        while let Some((q, node)) = self.lora(p)? {
            nodes.push(node);
            p = q;
        }
        Ok((!nodes.is_empty()).then_some((p, nodes)))
    }

    /// `ZeroOrMore` of one of the fragment lists.
    fn fragments(&self, mut p: usize, kind: Fragments) -> Result<(usize, Vec<Node>), SyntaxError> {
        let mut nodes = Vec::new();
        loop {
            let next = match kind {
                Fragments::Prompt => self.prompt_element(p)?,
                _ => self.fragment_element(p, kind)?,
            };
            match next {
                Some((q, found)) if q > p || !found.is_empty() => {
                    nodes.extend(found);
                    if q == p {
                        break;
                    }
                    p = q;
                }
                _ => break,
            }
        }
        Ok((p, nodes))
    }

    /// One element of `prompt`.
    fn prompt_element(&self, p: usize) -> Matched<Vec<Node>> {
        if let Some((q, n)) = self.swap(p)? {
            return Ok(Some((q, vec![n])));
        }
        if let Some((q, n)) = self.lora(p)? {
            return Ok(Some((q, vec![n])));
        }
        if let Some((q, n)) = self.attention(p)? {
            return Ok(Some((q, vec![n])));
        }
        if let Some(found) = self.quoted_fragment(p, Fragments::WithPunctuation)? {
            return Ok(Some(found));
        }
        if let Some(found) = self.parenthesized(p)? {
            return Ok(Some(found));
        }
        if let Some((q, word)) = self.free_word(p) {
            return Ok(Some((q, vec![Node::Text(fragment_text(&word))])));
        }
        // `White().suppress()`
        let q = self.skip(p);
        Ok((q > p).then_some((q, Vec::new())))
    }

    /// One element of `fragment_including_commas_or_periods` / `fragment_excluding_commas`.
    fn fragment_element(&self, p: usize, kind: Fragments) -> Matched<Vec<Node>> {
        if let Some((q, n)) = self.lora(p)? {
            return Ok(Some((q, vec![n])));
        }
        if let Some((q, n)) = self.attention(p)? {
            return Ok(Some((q, vec![n])));
        }
        if let Some((q, n)) = self.swap(p)? {
            return Ok(Some((q, vec![n])));
        }
        if let Some(found) = self.parenthesized(p)? {
            return Ok(Some(found));
        }
        if let Some(found) = self.quoted_fragment(p, Fragments::WithPunctuation)? {
            return Ok(Some(found));
        }
        if let Some((q, word)) = self.non_syntax_word(p) {
            return Ok(Some((q, vec![Node::Text(fragment_text(&word))])));
        }
        if kind == Fragments::WithPunctuation {
            let q = self.skip(p);
            if let Some(c @ (',' | '.')) = self.at(q) {
                return Ok(Some((q + 1, vec![Node::Text(c.to_string())])));
            }
        }
        Ok(None)
    }

    /// A word without syntax: escaped syntax characters, `+`/`-` followed by a word
    /// character, and any character that is neither whitespace nor syntax.
    fn non_syntax_word(&self, p: usize) -> Option<(usize, String)> {
        let start = self.skip(p);
        let mut q = start;
        while let Some(c) = self.at(q) {
            let next = self.at(q + 1);
            if c == '\\' && next.is_some_and(|n| SYNTAX.contains(&n)) {
                q += 2;
            } else if word_char(c)
                || ((c == '+' || c == '-')
                    && next.is_some_and(|n| !SKIPPED.contains(&n) && !SYNTAX.contains(&n)))
            {
                q += 1;
            } else {
                break;
            }
        }
        (q > start).then(|| (q, self.s[start..q].iter().collect()))
    }

    /// Any run of characters without whitespace.
    fn free_word(&self, p: usize) -> Option<(usize, String)> {
        let start = self.skip(p);
        let mut q = start;
        while self.at(q).is_some_and(|c| !STRING_WHITESPACE.contains(&c)) {
            q += 1;
        }
        (q > start).then(|| (q, self.s[start..q].iter().collect()))
    }

    /// `"..."` as pyparsing's `QuotedString('"', esc_quote='\\"')` reads it: the end and
    /// the unquoted text.
    fn quoted_string(&self, p: usize) -> Option<(usize, String)> {
        let q = self.skip(p);
        if self.at(q) != Some('"') {
            return None;
        }
        // The regex `"(?:\\"|[^"\n\r])*"`: an escaped quote may end the string when
        // nothing later does.
        let mut r = q + 1;
        let mut fallback = None;
        let end = loop {
            match self.at(r) {
                Some('\\') if self.at(r + 1) == Some('"') => {
                    fallback = Some(r + 2);
                    r += 2;
                }
                Some('"') => break Some(r + 1),
                Some('\n' | '\r') | None => break fallback,
                Some(_) => r += 1,
            }
        }?;
        let inner: String = self.s[q + 1..end - 1].iter().collect();
        Some((end, unquote(&inner).replace("\\\"", "\"")))
    }

    /// A quoted fragment: its text parsed as `kind`, whole (else no match).
    fn quoted_fragment(&self, p: usize, kind: Fragments) -> Matched<Vec<Node>> {
        self.memoized(p, kind as u8, || {
            self.deeper(|| self.parse_quoted_fragment(p, kind))
        })
    }

    fn parse_quoted_fragment(&self, p: usize, kind: Fragments) -> Matched<Vec<Node>> {
        let Some((end, text)) = self.quoted_string(p) else {
            return Ok(None);
        };
        if text.chars().all(py_space) {
            return Ok(Some((end, vec![Node::Text(String::new())])));
        }
        let inner = Parser::nested_in(&text.replace('"', "\\\""), self.depth.get());
        let (q, nodes) = inner.fragments(0, kind)?;
        Ok((inner.skip(q) == inner.s.len()).then_some((end, nodes)))
    }

    /// `( fragments )`: the fragments, spliced into the parent.
    fn parenthesized(&self, p: usize) -> Matched<Vec<Node>> {
        self.memoized(p, 255, || self.deeper(|| self.parse_parenthesized(p)))
    }

    fn parse_parenthesized(&self, p: usize) -> Matched<Vec<Node>> {
        let Some(q) = self.literal(p, "(") else {
            return Ok(None);
        };
        let (q, nodes) = self.fragments(q, Fragments::WithPunctuation)?;
        Ok(self.literal(q, ")").map(|q| (q, nodes)))
    }

    /// `potential_operator_target`: quoted, parenthesised or a bare word.
    fn operator_target(&self, p: usize) -> Matched<Vec<Node>> {
        if let Some(found) = self.quoted_fragment(p, Fragments::WithPunctuation)? {
            return Ok(Some(found));
        }
        if let Some(found) = self.parenthesized(p)? {
            return Ok(Some(found));
        }
        Ok(self
            .non_syntax_word(p)
            .map(|(q, w)| (q, vec![Node::Text(fragment_text(&w))])))
    }

    /// `attention_explicit | attention_implicit`.
    fn attention(&self, p: usize) -> Matched<Node> {
        if let Some((q, target)) = self.operator_target(p)? {
            if let Some(r) = self.literal(q, ".attend") {
                if let Some(r) = self.literal(r, "(") {
                    if let Some((r, weight)) = self.attention_weight(r) {
                        if let Some(r) = self.literal(r, ")") {
                            return Ok(Some((r, Node::Attention(weight, target))));
                        }
                    }
                }
            }
        }
        let quoted_or_parenthesized = match self.quoted_fragment(p, Fragments::WithPunctuation)? {
            Some(found) => Some(found),
            None => self.parenthesized(p)?,
        };
        if let Some((q, target)) = quoted_or_parenthesized {
            if self.at(q).is_some_and(|c| !SKIPPED.contains(&c)) {
                if let Some((r, weight)) = self.attention_weight(q) {
                    return Ok(Some((r, Node::Attention(weight, target))));
                }
            }
            return Ok(None);
        }
        if let Some((q, word)) = self.non_syntax_word(p) {
            if self.at(q).is_some_and(|c| !SKIPPED.contains(&c)) {
                if let Some((r, weight)) = self.signs(q) {
                    let target = vec![Node::Text(fragment_text(&word))];
                    return Ok(Some((r, Node::Attention(weight, target))));
                }
            }
        }
        Ok(None)
    }

    /// `Word('+') | Word('-') | number`.
    fn attention_weight(&self, p: usize) -> Option<(usize, f64)> {
        self.signs(p).or_else(|| self.number(p))
    }

    /// A run of `+` (1.1 each) or of `-` (0.9 each), as compel's `pow(base, len)`.
    fn signs(&self, p: usize) -> Option<(usize, f64)> {
        let q = self.skip(p);
        let c = self.at(q).filter(|c| *c == '+' || *c == '-')?;
        let mut r = q;
        while self.at(r) == Some(c) {
            r += 1;
        }
        let base: f64 = if c == '+' { 1.1 } else { 0.9 };
        Some((r, base.powf((r - q) as f64)))
    }

    /// pyparsing's `real` (`[+-]?(\d+\.\d*|\.\d+)`) or an integer (`-?\d+`): the end and
    /// the matched text.
    fn number_text(&self, p: usize) -> Option<(usize, String)> {
        let q = self.skip(p);
        let digits = |mut r: usize| {
            while self.at(r).is_some_and(|c| c.is_ascii_digit()) {
                r += 1;
            }
            r
        };
        let signed = if matches!(self.at(q), Some('+' | '-')) {
            q + 1
        } else {
            q
        };
        let int_end = digits(signed);
        let real_end = if int_end > signed && self.at(int_end) == Some('.') {
            Some(digits(int_end + 1))
        } else if int_end == signed && self.at(signed) == Some('.') {
            let e = digits(signed + 1);
            (e > signed + 1).then_some(e)
        } else {
            None
        };
        let end = match real_end {
            Some(e) => e,
            None if self.at(q) == Some('+') => return None,
            None if int_end > signed => int_end,
            None => return None,
        };
        Some((end, self.s[q..end].iter().collect()))
    }

    fn number(&self, p: usize) -> Option<(usize, f64)> {
        let (q, text) = self.number_text(p)?;
        Some((q, python_float(&text)?))
    }

    /// `Word(alphanums + '_-')`.
    fn keyword(&self, p: usize) -> Option<(usize, String)> {
        let q = self.skip(p);
        let mut r = q;
        while self
            .at(r)
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            r += 1;
        }
        (r > q).then(|| (r, self.s[q..r].iter().collect()))
    }

    /// One option of an operator: `key=value`, a number (its text) or a flag.
    fn option(&self, p: usize) -> Option<(usize, String)> {
        if let Some((q, key)) = self.keyword(p) {
            if let Some(r) = self.literal(q, "=") {
                if let Some((r, _)) = self.number_text(r).or_else(|| self.keyword(r)) {
                    return Some((r, key));
                }
            }
        }
        self.number_text(p).or_else(|| self.keyword(p))
    }

    /// `Optional(DelimitedList(option))`: each option's first token.
    fn options(&self, p: usize) -> (usize, Vec<String>) {
        let mut firsts = Vec::new();
        let Some((mut q, first)) = self.option(p) else {
            return (p, firsts);
        };
        firsts.push(first);
        while let Some((r, next)) = self.literal(q, ",").and_then(|r| self.option(r)) {
            firsts.push(next);
            q = r;
        }
        (q, firsts)
    }

    /// `target.swap(replacement[, options])`.
    fn swap(&self, p: usize) -> Matched<Node> {
        let Some((q, _)) = self.operator_target(p)? else {
            return Ok(None);
        };
        let Some(q) = self.literal(q, ".swap").and_then(|q| self.literal(q, "(")) else {
            return Ok(None);
        };
        let (mut q, _) = self.fragments(q, Fragments::WithoutPunctuation)?;
        if let Some(r) = self.literal(q, ",") {
            q = self.options(r).0;
        }
        Ok(self.literal(q, ")").map(|q| (q, Node::Swap)))
    }

    /// `useLora(name[, weight])` / `withLora(...)`.
    fn lora(&self, p: usize) -> Matched<Node> {
        let Some(q) = self
            .literal(p, "useLora")
            .or_else(|| self.literal(p, "withLora"))
        else {
            return Ok(None);
        };
        let Some((mut q, _)) = self.literal(q, "(").and_then(|q| self.keyword(q)) else {
            return Ok(None);
        };
        if let Some((r, _)) = self.literal(q, ",").and_then(|r| self.number(r)) {
            q = r;
        }
        Ok(self.literal(q, ")").map(|q| (q, Node::Lora)))
    }

    /// `( target, target... ).op( options )` for `op` in `ops`: the end, the targets
    /// and the options' first tokens.
    fn operator_list(&self, p: usize, ops: &[&str]) -> Matched<(Vec<Vec<Node>>, Vec<String>)> {
        let Some(q) = self.literal(p, "(") else {
            return Ok(None);
        };
        self.deeper(|| self.operator_targets(q, ops))
    }

    /// [`Self::operator_list`] after its opening parenthesis.
    fn operator_targets(
        &self,
        mut q: usize,
        ops: &[&str],
    ) -> Matched<(Vec<Vec<Node>>, Vec<String>)> {
        let mut targets = Vec::new();
        loop {
            let target = match self.operator_target(q)? {
                Some(found) => Some(found),
                None => self.quoted_fragment(q, Fragments::Prompt)?,
            };
            let Some((r, nodes)) = target else {
                if targets.is_empty() {
                    return Ok(None);
                }
                break;
            };
            targets.push(nodes);
            q = r;
            match self.literal(q, ",") {
                Some(r)
                    if self.operator_target(r)?.is_some()
                        || self.quoted_fragment(r, Fragments::Prompt)?.is_some() =>
                {
                    q = r
                }
                _ => break,
            }
        }
        let Some(q) = self.literal(q, ")") else {
            return Ok(None);
        };
        let Some(q) = ops.iter().find_map(|op| self.literal(q, op)) else {
            return Ok(None);
        };
        let Some(q) = self.literal(q, "(") else {
            return Ok(None);
        };
        let (q, options) = self.options(q);
        Ok(self.literal(q, ")").map(|q| (q, (targets, options))))
    }

    /// `( targets ).blend( weights[, no_normalize] )`.
    fn blend(&self, p: usize) -> Matched<TopPart> {
        let Some((q, (prompts, mut options))) = self.operator_list(p, &[".blend"])? else {
            return Ok(None);
        };
        let mut normalize = true;
        if options.last().is_some_and(|o| o == "no_normalize") {
            normalize = false;
            options.pop();
        }
        let weights = option_weights(&options, ".blend")?;
        Ok(Some((
            q,
            TopPart::Blend {
                prompts,
                weights,
                normalize,
            },
        )))
    }

    /// `( targets ).and( weights )` (or `.add`).
    fn explicit_conjunction(&self, p: usize) -> Matched<Tree> {
        let Some((q, (prompts, options))) = self.operator_list(p, &[".and", ".add"])? else {
            return Ok(None);
        };
        let weights = option_weights(&options, ".and")?;
        let parts = prompts.into_iter().map(TopPart::Prompt).collect();
        Ok(Some((q, Tree { parts, weights })))
    }
}

/// The weights of an operator's options, read with Python's `float` as compel does.
fn option_weights(options: &[String], op: &str) -> Result<Vec<f64>, SyntaxError> {
    options
        .iter()
        .map(|o| {
            python_float(o).ok_or_else(|| {
                SyntaxError::Unparsable(format!("`{op}()` weight `{o}` is not a number"))
            })
        })
        .collect()
}
