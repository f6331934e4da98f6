//! Stream-name patterns: the one syntax of every command and request that
//! names streams (`memsock record --stream`, `replay --stream`, a pattern
//! subscription, a watch, a listing).
//!
//! A stream name is a sequence of parts separated by `/`
//! (`camera/front/raw`). In a pattern:
//!
//! - `*` matches any run of characters within one part, none included,
//!   never a `/`: `camera/*` matches `camera/front` but not
//!   `camera/front/raw`; `cam*/raw` matches `camera/raw` and `cam/raw`.
//! - `**` as a whole part matches any number of whole parts, none
//!   included: `camera/**` matches `camera`, `camera/front` and
//!   `camera/front/raw`; `**/raw` matches `raw` and `camera/front/raw`;
//!   `a/**/b` matches `a/b` and `a/x/y/b`; `**` alone matches every
//!   stream. A `**` that
//!   is not a whole part (`a**`) is refused.
//! - `\` makes the next character literal (`\*`, `\\`), for names that
//!   contain a `*`.
//! - Everything else matches itself: a name without wildcards is a
//!   pattern that matches exactly that stream.

use serde::{Deserialize, Serialize};

use crate::control::MAX_STREAM_NAME;

/// What is wrong with a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern is empty or longer than a stream name may be.
    #[error("a pattern has 1 to {MAX_STREAM_NAME} bytes, this one {0}")]
    Length(usize),
    /// A control character.
    #[error("a pattern has no control characters")]
    ControlCharacter,
    /// A `**` inside a part (`a**`, `**b`).
    #[error("`**` must be a whole part (between slashes), as in `a/**/b`; in part {0:?}")]
    DoubleStarInPart(String),
    /// A `\` at the end, escaping nothing.
    #[error("a trailing `\\` escapes nothing")]
    TrailingEscape,
}

/// One piece of a part.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Characters that must be there.
    Literal(String),
    /// `*`: any run of characters, no `/`.
    Star,
}

/// One `/`-separated part of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// `**`: any number of whole parts.
    Any,
    /// Pieces matched against one part of the name.
    Glob(Vec<Piece>),
}

/// A parsed stream-name pattern (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    parts: Vec<Part>,
}

impl Pattern {
    /// Parses `text`.
    ///
    /// # Errors
    /// [`PatternError`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() || text.len() > MAX_STREAM_NAME {
            return Err(PatternError::Length(text.len()));
        }
        if text.chars().any(char::is_control) {
            return Err(PatternError::ControlCharacter);
        }
        let mut parts = Vec::new();
        let mut pieces = Vec::new();
        let mut literal = String::new();
        // The raw text of the current part, for `**` and error messages.
        let mut raw = String::new();
        let mut chars = text.chars();
        let end_part = |pieces: &mut Vec<Piece>, literal: &mut String, raw: &mut String, parts: &mut Vec<Part>| {
            if raw == "**" {
                parts.push(Part::Any);
            } else {
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(literal)));
                }
                parts.push(Part::Glob(std::mem::take(pieces)));
            }
            pieces.clear();
            literal.clear();
            raw.clear();
        };
        while let Some(c) = chars.next() {
            match c {
                '/' => end_part(&mut pieces, &mut literal, &mut raw, &mut parts),
                '\\' => {
                    let escaped = chars.next().ok_or(PatternError::TrailingEscape)?;
                    raw.push('\\');
                    raw.push(escaped);
                    literal.push(escaped);
                }
                '*' => {
                    raw.push('*');
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    // A second star makes `**`: a whole part, or refused below.
                    pieces.push(Piece::Star);
                }
                c => {
                    raw.push(c);
                    literal.push(c);
                }
            }
            if raw.contains("**") && raw != "**" {
                // Another character joined a `**` (or a third star came).
                return Err(PatternError::DoubleStarInPart(raw.clone()));
            }
        }
        end_part(&mut pieces, &mut literal, &mut raw, &mut parts);
        Ok(Self { text: text.into(), parts })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern has no wildcard: it matches one name only.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Glob(pieces) if pieces.iter().all(|x| *x != Piece::Star)))
    }

    /// Whether stream `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('/').collect();
        match_parts(&self.parts, &parts)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Pattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, PatternError> {
        Self::parse(s)
    }
}

/// Whether `name`'s parts match `pattern`'s. A `**` tries every number of
/// parts; the recursion is as deep as the pattern has parts (at most 128:
/// a name is at most 255 bytes).
fn match_parts(pattern: &[Part], name: &[&str]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Part::Any, rest)) => (0..=name.len()).any(|skip| match_parts(rest, &name[skip..])),
        Some((Part::Glob(pieces), rest)) => {
            name.split_first().is_some_and(|(first, tail)| match_part(pieces, first) && match_parts(rest, tail))
        }
    }
}

/// Whether one part of a name matches `pieces`: literals in order, each
/// `*` absorbing what lies between (the classic greedy match with one
/// backtrack point, linear in practice).
fn match_part(pieces: &[Piece], part: &str) -> bool {
    let mut rest = part;
    let mut star = false;
    for (i, piece) in pieces.iter().enumerate() {
        match piece {
            Piece::Star => star = true,
            Piece::Literal(lit) => {
                let last = i == pieces.len() - 1;
                if !star {
                    let Some(after) = rest.strip_prefix(lit.as_str()) else { return false };
                    rest = after;
                } else if last {
                    // The last literal after a star must end the part.
                    return rest.ends_with(lit.as_str());
                } else {
                    let Some(at) = rest.find(lit.as_str()) else { return false };
                    rest = &rest[at + lit.len()..];
                }
                star = false;
            }
        }
    }
    star || rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn the_documented_examples() {
        assert!(m("camera/*", "camera/front"));
        assert!(!m("camera/*", "camera/front/raw"));
        assert!(m("cam*/raw", "camera/raw"));
        assert!(m("cam*/raw", "cam/raw"));
        assert!(m("camera/**", "camera/front"));
        assert!(m("camera/**", "camera/front/raw"));
        assert!(m("camera/**", "camera"), "`**` matches zero parts too");
        assert!(!m("camera/**", "cameras/front"));
        assert!(m("**/raw", "raw"));
        assert!(m("**/raw", "camera/front/raw"));
        assert!(!m("**/raw", "camera/rawx"));
        assert!(m("**", "anything/at/all"));
        assert!(m("a/**/b", "a/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(!m("a/**/b", "a/x/y/c"));
        assert!(m("*", "video"));
        assert!(!m("*", "video/left"));
        assert!(m("video", "video"));
        assert!(!m("video", "video2"));
        assert!(m("*a*b*", "xaybz"));
        assert!(!m("*a*b", "xaybz"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a\\\\b", "a\\b"));
        assert!(m("md/*.bid", "md/eu.bid"));
        assert!(!m("md/*.bid", "md/eu.ask"));
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Length(0)));
        assert_eq!(Pattern::parse(&"x".repeat(256)), Err(PatternError::Length(256)));
        assert_eq!(Pattern::parse("a\nb"), Err(PatternError::ControlCharacter));
        assert_eq!(Pattern::parse("a**"), Err(PatternError::DoubleStarInPart("a**".into())));
        assert_eq!(Pattern::parse("x/**b/y"), Err(PatternError::DoubleStarInPart("**b".into())));
        assert_eq!(Pattern::parse("***"), Err(PatternError::DoubleStarInPart("***".into())));
        assert_eq!(Pattern::parse("a\\"), Err(PatternError::TrailingEscape));
        assert!(Pattern::parse("a\\*\\*").is_ok(), "escaped stars are literal");
        let text = PatternError::DoubleStarInPart("a**".into()).to_string();
        assert!(text.contains("a/**/b"), "{text}");
    }

    #[test]
    fn literal_patterns() {
        assert!(Pattern::parse("camera/front").unwrap().is_literal());
        assert!(Pattern::parse("a\\*").unwrap().is_literal());
        assert!(!Pattern::parse("a/*").unwrap().is_literal());
        assert!(!Pattern::parse("**").unwrap().is_literal());
    }

    /// The model, by brute force: every `**` replaced by 0, 1, ... `*`
    /// parts (as many as the name has parts at most), and each resulting
    /// pattern matched part by part with a character-level recursive glob.
    fn model(pattern: &str, name: &str) -> bool {
        fn glob(p: &[char], s: &[char]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some(('*', rest)) => (0..=s.len()).any(|k| glob(rest, &s[k..])),
                Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
            }
        }
        fn expand(parts: &[&str], max: usize, acc: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            match parts.split_first() {
                None => out.push(acc.clone()),
                Some((&"**", rest)) => {
                    for j in 0..=max {
                        let n = acc.len();
                        acc.extend(std::iter::repeat_n("*".to_string(), j));
                        expand(rest, max, acc, out);
                        acc.truncate(n);
                    }
                }
                Some((part, rest)) => {
                    acc.push(part.to_string());
                    expand(rest, max, acc, out);
                    acc.pop();
                }
            }
        }
        let name_parts: Vec<Vec<char>> = name.split('/').map(|p| p.chars().collect()).collect();
        let mut expanded = Vec::new();
        expand(&pattern.split('/').collect::<Vec<_>>(), name_parts.len(), &mut Vec::new(), &mut expanded);
        expanded.iter().any(|parts| {
            parts.len() == name_parts.len()
                && parts.iter().zip(&name_parts).all(|(p, n)| glob(&p.chars().collect::<Vec<_>>(), n))
        })
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "ba", "/"]), 1..8)
            .prop_map(|v| v.concat())
            .prop_filter("a name has no empty part at the ends", |s| !s.is_empty())
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let part = prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 1..4).prop_map(|v| {
            // No `**` inside a part: a star never follows a star.
            let mut s = String::new();
            for x in v {
                if !(x == "*" && s.ends_with('*')) {
                    s.push_str(x);
                }
            }
            s
        });
        let part = prop_oneof![3 => part, 1 => Just("**".to_string())];
        prop::collection::vec(part, 1..4).prop_map(|v| v.join("/"))
    }

    proptest! {
        #[test]
        fn matches_as_the_model(pattern in pattern_strategy(), name in name_strategy()) {
            let p = Pattern::parse(&pattern).unwrap();
            prop_assert_eq!(p.matches(&name), model(&pattern, &name), "{} against {}", pattern, name);
        }
    }
}
