//! Stream-key templates (sans-IO): `{tag}`, `{svc}`, `{namespace}/{app}`, `k8s-{app}`.
//!
//! Owns: parsing and validating a template, and rendering it for one record into a reused
//! buffer. Must not: allocate per record or know how record fields are extracted (the caller
//! passes a lookup by field index).
//!
//! Syntax: literal text with `{name}` placeholders; `{{` and `}}` are literal braces.
//! `{tag}` is the record's input tag (stdin tag, file base name, forward tag); any other name
//! is a top-level field of the parsed record (JSON key, logfmt key, regex capture, or
//! `message` for raw lines). Names may contain `A-Z a-z 0-9 _ . - @`; a dot is part of the
//! key name (no nested lookup). A field that is missing, null, an array/object or an empty
//! string renders as `_`. Keys are cut to [`MAX_KEY_LEN`] bytes (at a char boundary).

use std::fmt;
use std::str::FromStr;

/// Longest rendered stream key, in bytes (the wire allows 65535).
pub const MAX_KEY_LEN: usize = 512;

/// What a missing or empty field renders as.
pub const MISSING: &str = "_";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Tag,
    Field(usize),
}

/// A parsed stream-key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
    fields: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("stream key template is empty; use e.g. \"{{tag}}\" or \"{{namespace}}/{{app}}\"")]
    Empty,
    #[error("stream key template {template:?}: '{{' at byte {pos} is never closed; add '}}' or write '{{{{' for a literal brace")]
    Unclosed { template: String, pos: usize },
    #[error("stream key template {template:?}: '}}' at byte {pos} has no matching '{{'; write '}}}}' for a literal brace")]
    StrayClose { template: String, pos: usize },
    #[error("stream key template {template:?}: empty placeholder '{{}}' at byte {pos}; put a field name inside, e.g. {{app}}")]
    EmptyName { template: String, pos: usize },
    #[error("stream key template {template:?}: field name {name:?} may only contain letters, digits, '_', '.', '-', '@'")]
    BadName { template: String, name: String },
}

impl Default for Template {
    fn default() -> Self {
        Template {
            source: "{tag}".into(),
            parts: vec![Part::Tag],
            fields: Vec::new(),
        }
    }
}

impl Template {
    /// The default template, `{tag}`.
    pub fn tag() -> Self {
        Self::default()
    }

    /// The template text as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Record field names the template needs (without `tag`), each once, in first-use order.
    /// [`Template::render`] looks values up by index into this slice.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Append the key for one record to `out` (not cleared). `field(i)` returns the value of
    /// `self.fields()[i]` if the record has it.
    pub fn render<'v>(
        &self,
        tag: &str,
        field: impl Fn(usize) -> Option<&'v str>,
        out: &mut String,
    ) {
        let start = out.len();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Tag => push_or_missing(out, tag),
                Part::Field(i) => push_or_missing(out, field(*i).unwrap_or("")),
            }
        }
        if out.len() - start > MAX_KEY_LEN {
            let mut cut = start + MAX_KEY_LEN;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
    }
}

fn push_or_missing(out: &mut String, v: &str) {
    out.push_str(if v.is_empty() { MISSING } else { v });
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '@')
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut fields: Vec<String> = Vec::new();
        let mut lit = String::new();
        let mut it = s.char_indices().peekable();
        while let Some((pos, c)) = it.next() {
            match c {
                '{' if it.peek().map(|&(_, c)| c) == Some('{') => {
                    it.next();
                    lit.push('{');
                }
                '}' if it.peek().map(|&(_, c)| c) == Some('}') => {
                    it.next();
                    lit.push('}');
                }
                '}' => {
                    return Err(TemplateError::StrayClose {
                        template: s.to_owned(),
                        pos,
                    })
                }
                '{' => {
                    let rest = &s[pos + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(TemplateError::Unclosed {
                            template: s.to_owned(),
                            pos,
                        });
                    };
                    let name = rest[..end].trim();
                    if name.is_empty() {
                        return Err(TemplateError::EmptyName {
                            template: s.to_owned(),
                            pos,
                        });
                    }
                    if !name.chars().all(valid_name_char) {
                        return Err(TemplateError::BadName {
                            template: s.to_owned(),
                            name: name.to_owned(),
                        });
                    }
                    // consume up to and including the '}'
                    for (p, _) in it.by_ref() {
                        if p == pos + 1 + end {
                            break;
                        }
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    if name == "tag" {
                        parts.push(Part::Tag);
                    } else {
                        let idx = match fields.iter().position(|f| f == name) {
                            Some(i) => i,
                            None => {
                                fields.push(name.to_owned());
                                fields.len() - 1
                            }
                        };
                        parts.push(Part::Field(idx));
                    }
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template {
            source: s.to_owned(),
            parts,
            fields,
        })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn render(t: &Template, tag: &str, vals: &[(&str, &str)]) -> String {
        let mut out = String::new();
        t.render(
            tag,
            |i| {
                let name = &t.fields()[i];
                vals.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
            },
            &mut out,
        );
        out
    }

    #[test]
    fn parses_and_renders() {
        let t: Template = "{namespace}/{app}".parse().unwrap();
        assert_eq!(t.fields(), &["namespace".to_string(), "app".to_string()]);
        assert_eq!(
            render(&t, "x", &[("app", "web"), ("namespace", "prod")]),
            "prod/web"
        );
        assert_eq!(render(&t, "x", &[("app", "web")]), "_/web");
        assert_eq!(render(&t, "x", &[("app", ""), ("namespace", "n")]), "n/_");
        let t: Template = "{tag}".parse().unwrap();
        assert!(t.fields().is_empty());
        assert_eq!(render(&t, "app.log", &[]), "app.log");
        assert_eq!(t, Template::default());
        let t: Template = "k8s-{ app }-{{x}}-{app}{tag}".parse().unwrap();
        assert_eq!(t.fields(), &["app".to_string()]);
        assert_eq!(render(&t, "T", &[("app", "é")]), "k8s-é-{x}-éT");
        assert_eq!(t.to_string(), "k8s-{ app }-{{x}}-{app}{tag}");
        let t: Template = "static".parse().unwrap();
        assert_eq!(render(&t, "T", &[]), "static");
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!("".parse::<Template>().unwrap_err(), TemplateError::Empty);
        let e = "{app".parse::<Template>().unwrap_err();
        assert!(matches!(e, TemplateError::Unclosed { pos: 0, .. }), "{e}");
        assert!(e.to_string().contains("never closed"));
        let e = "a}b".parse::<Template>().unwrap_err();
        assert!(matches!(e, TemplateError::StrayClose { pos: 1, .. }), "{e}");
        let e = "x{}".parse::<Template>().unwrap_err();
        assert!(matches!(e, TemplateError::EmptyName { pos: 1, .. }), "{e}");
        let e = "{a b}".parse::<Template>().unwrap_err();
        assert!(e.to_string().contains("\"a b\""), "{e}");
    }

    #[test]
    fn long_keys_are_cut_at_char_boundary() {
        let t: Template = "{m}".parse().unwrap();
        let v = "é".repeat(MAX_KEY_LEN);
        let out = render(&t, "", &[("m", &v)]);
        assert!(out.len() <= MAX_KEY_LEN && out.len() >= MAX_KEY_LEN - 1);
    }

    proptest! {
        #[test]
        fn prop_parse_never_panics(s in "\\PC{0,20}") {
            if let Ok(t) = s.parse::<Template>() {
                let mut out = String::new();
                t.render("tag", |_| Some("v"), &mut out);
                prop_assert!(out.len() <= MAX_KEY_LEN);
            }
        }

        #[test]
        fn prop_literal_roundtrip(s in "[^{}]{1,30}") {
            let t: Template = s.parse().unwrap();
            let mut out = String::new();
            t.render("tag", |_| None, &mut out);
            prop_assert_eq!(out, s);
        }
    }
}
