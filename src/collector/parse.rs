//! Line formats (sans-IO): `--format auto|json|logfmt|raw|regex:<re>`, and the low-level
//! pieces the record builder uses to turn one input line into fields without re-serializing it.
//!
//! Owns: [`Format`] and its parsing, JSON object validation with field extraction
//! ([`scan_json_object`]), logfmt tokenizing ([`parse_logfmt`]), JSON string escaping
//! ([`write_json_str`]) and the rewrite of input keys that collide with metadata names.
//! Must not: allocate per line (all scratch lives in caller-owned reusable buffers), do I/O,
//! read clocks, or re-serialize a valid JSON input object (its fields go out byte for byte).

use std::fmt;
use std::fmt::Write as _;
use std::ops::Range;
use std::str::FromStr;

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

/// How input lines are parsed.
#[derive(Debug, Clone, Default)]
pub enum Format {
    /// A JSON object if the line is one, otherwise a raw `message`.
    #[default]
    Auto,
    /// JSON objects; a line that is not one is kept as a raw `message` with `_parse_error: true`.
    Json,
    /// `key=value key2="quoted value"` → an object of string fields.
    Logfmt,
    /// `{"message": line}`.
    Raw,
    /// Named captures become string fields; a line that does not match is kept as a raw
    /// `message` with `_parse_error: true`.
    Regex(regex::Regex),
    /// Docker json-file container logs (`--tail` only; see `collector::container`). The
    /// joined message is parsed like `Auto`.
    Docker,
    /// CRI container logs (`--tail` only), parsed like `Docker`.
    Cri,
}

/// Why a `--format` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "unknown format {0:?}: use one of auto, json, logfmt, raw, docker, cri, regex:<pattern>"
    )]
    Unknown(String),
    #[error(
        "format 'regex:' needs a pattern after the colon, e.g. regex:^(?P<level>\\w+) (?P<message>.*)$"
    )]
    EmptyRegex,
    #[error("format regex {pattern:?} does not compile; fix the pattern: {source}")]
    BadRegex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error(
        "format regex {0:?} has no named capture group; name the fields to extract, \
         e.g. (?P<level>\\w+) or (?<level>\\w+)"
    )]
    NoNamedCaptures(String),
}

impl FromStr for Format {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(pattern) = s.strip_prefix("regex:") {
            if pattern.is_empty() {
                return Err(FormatError::EmptyRegex);
            }
            let re = regex::Regex::new(pattern).map_err(|source| FormatError::BadRegex {
                pattern: pattern.to_owned(),
                source,
            })?;
            if !re.capture_names().any(|n| n.is_some()) {
                return Err(FormatError::NoNamedCaptures(pattern.to_owned()));
            }
            return Ok(Format::Regex(re));
        }
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Format::Auto),
            "json" => Ok(Format::Json),
            "logfmt" => Ok(Format::Logfmt),
            "raw" => Ok(Format::Raw),
            "docker" => Ok(Format::Docker),
            "cri" => Ok(Format::Cri),
            _ => Err(FormatError::Unknown(s.to_owned())),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Auto => f.write_str("auto"),
            Format::Json => f.write_str("json"),
            Format::Logfmt => f.write_str("logfmt"),
            Format::Raw => f.write_str("raw"),
            Format::Regex(re) => write!(f, "regex:{}", re.as_str()),
            Format::Docker => f.write_str("docker"),
            Format::Cri => f.write_str("cri"),
        }
    }
}

/// Metadata keys the collector adds to every record. An input key with one of these names is
/// renamed to `_orig<name>` (e.g. `_id` → `_orig_id`) so the output never has duplicate keys.
pub const RESERVED_KEYS: &[&str] = &[
    "_ts",
    "_tag",
    "_stream",
    "_id",
    "_truncated",
    "_invalid_utf8",
    "_parse_error",
];

/// Prefix given to input keys that collide with [`RESERVED_KEYS`].
pub const RENAMED_PREFIX: &str = "_orig";

#[inline]
pub fn is_reserved(key: &str) -> bool {
    key.starts_with('_') && RESERVED_KEYS.contains(&key)
}

/// Values of the fields a template needs, for one line. Reused between lines.
#[derive(Debug, Clone, Default)]
pub struct FieldVals {
    buf: String,
    spans: Vec<Option<Range<usize>>>,
}

impl FieldVals {
    /// Forget the previous line's values and prepare `n` empty slots.
    pub fn reset(&mut self, n: usize) {
        self.buf.clear();
        self.spans.clear();
        self.spans.resize(n, None);
    }

    pub fn set(&mut self, idx: usize, value: &str) {
        let start = self.buf.len();
        self.buf.push_str(value);
        if let Some(slot) = self.spans.get_mut(idx) {
            *slot = Some(start..self.buf.len());
        }
    }

    fn set_with(&mut self, idx: usize, f: impl FnOnce(&mut String)) {
        let start = self.buf.len();
        f(&mut self.buf);
        if let Some(slot) = self.spans.get_mut(idx) {
            *slot = Some(start..self.buf.len());
        }
    }

    pub fn get(&self, idx: usize) -> Option<&str> {
        let r = self.spans.get(idx)?.clone()?;
        self.buf.get(r)
    }
}

/// What [`scan_json_object`] looks for and what it found.
pub struct JsonScan<'a> {
    /// Names of the fields to extract (the stream-key template's fields).
    pub fields: &'a [String],
    /// Static label keys: `label_present[i]` is set when the input has `label_keys[i]`.
    pub label_keys: &'a [String],
    pub vals: &'a mut FieldVals,
    pub label_present: &'a mut [bool],
    /// Number of top-level keys seen.
    pub n_keys: usize,
    /// The object has a top-level key in [`RESERVED_KEYS`].
    pub reserved: bool,
}

/// Validate that `text` is exactly one JSON object (surrounding whitespace allowed) and
/// extract the top-level fields named in `scan.fields` as text (strings unescaped, numbers
/// and booleans as written by serde_json; null, arrays and objects count as missing).
/// Does not allocate unless a key or a wanted string contains escapes.
pub fn scan_json_object(text: &str, scan: &mut JsonScan<'_>) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(ObjVisitor(scan))?;
    de.end()
}

struct ObjVisitor<'s, 'a>(&'s mut JsonScan<'a>);

impl<'de> Visitor<'de> for ObjVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let s = self.0;
        while let Some(k) = map.next_key_seed(KeySeed {
            fields: s.fields,
            labels: s.label_keys,
        })? {
            s.n_keys += 1;
            s.reserved |= k.reserved;
            if let Some(li) = k.label {
                if let Some(p) = s.label_present.get_mut(li) {
                    *p = true;
                }
            }
            match k.field {
                Some(idx) => map.next_value_seed(ValSeed {
                    vals: &mut *s.vals,
                    idx,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct KeyClass {
    field: Option<usize>,
    label: Option<usize>,
    reserved: bool,
}

struct KeySeed<'a> {
    fields: &'a [String],
    labels: &'a [String],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = KeyClass;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<KeyClass, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = KeyClass;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, k: &str) -> Result<KeyClass, E> {
        Ok(KeyClass {
            field: self.fields.iter().position(|f| f == k),
            label: self.labels.iter().position(|l| l == k),
            reserved: is_reserved(k),
        })
    }
}

struct ValSeed<'a> {
    vals: &'a mut FieldVals,
    idx: usize,
}

impl<'de> DeserializeSeed<'de> for ValSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.vals.set(self.idx, v);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.vals.set(self.idx, if v { "true" } else { "false" });
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.vals.set_with(self.idx, |b| {
            let _ = write!(b, "{v}");
        });
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.vals.set_with(self.idx, |b| {
            let _ = write!(b, "{v}");
        });
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.vals.set_with(self.idx, |b| {
            let _ = write!(b, "{v}");
        });
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Append `obj` (a JSON object already validated by [`scan_json_object`], trimmed) to `out`
/// WITHOUT its closing `}`, renaming top-level keys in [`RESERVED_KEYS`] to
/// `_orig<key>`. Everything else is copied byte for byte. Slow path: only for objects that
/// collide with metadata names.
pub fn copy_object_renaming_reserved(obj: &str, out: &mut Vec<u8>) {
    let b = obj.as_bytes();
    let body_end = b.len().saturating_sub(1); // index of the closing '}'
    let mut copied = 0; // b[..copied] is already in `out`
    let mut i = 1; // after '{'
    loop {
        i = skip_ws(b, i);
        if i >= body_end || b[i] != b'"' {
            break;
        }
        let kend = skip_string(b, i);
        if let Some(key) = obj
            .get(i..kend)
            .and_then(|k| serde_json::from_str::<std::borrow::Cow<'_, str>>(k).ok())
        {
            if is_reserved(&key) {
                out.extend_from_slice(&b[copied..i]);
                let mut renamed = String::with_capacity(RENAMED_PREFIX.len() + key.len());
                renamed.push_str(RENAMED_PREFIX);
                renamed.push_str(&key);
                write_json_str(out, &renamed);
                copied = kend;
            }
        }
        i = skip_ws(b, kend);
        if i >= body_end || b[i] != b':' {
            break;
        }
        i = skip_value(b, i + 1);
        if i >= body_end || b[i] != b',' {
            break;
        }
        i += 1;
    }
    out.extend_from_slice(&b[copied.min(body_end)..body_end]);
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `b[i]` is an opening quote; returns the index after the closing quote.
fn skip_string(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// Skip one value starting at `i`; returns the index of the `,` or `}` that ends it at the
/// enclosing object's level.
fn skip_value(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = skip_string(b, i);
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                if depth == 0 {
                    return i;
                }
                depth -= 1;
            }
            b',' if depth == 0 => return i,
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// Scratch space for one logfmt line: `(key, value)` ranges into `buf`.
#[derive(Debug, Clone, Default)]
pub struct LogfmtFields {
    buf: String,
    pairs: Vec<(Range<usize>, Range<usize>)>,
}

impl LogfmtFields {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| {
            (
                self.buf.get(k.clone()).unwrap_or(""),
                self.buf.get(v.clone()).unwrap_or(""),
            )
        })
    }
    pub fn len(&self) -> usize {
        self.pairs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Tokenize a logfmt line into `out` (cleared first). Returns false when the line has no
/// `key=value` pair at all (then it is not logfmt).
///
/// Rules: pairs are separated by whitespace; `key=value`, `key="quoted value"` (escapes
/// `\" \\ \n \r \t \uXXXX`; other escapes are kept as written; an unterminated quote runs
/// to the end of the line); a bare `key` has the value `""`; tokens with an empty key are
/// skipped; a repeated key keeps its first value.
pub fn parse_logfmt(line: &str, out: &mut LogfmtFields) -> bool {
    out.buf.clear();
    out.pairs.clear();
    let b = line.as_bytes();
    let n = b.len();
    let mut i = 0;
    let mut saw_pair = false;
    while i < n {
        while i < n && b[i] <= b' ' {
            i += 1;
        }
        if i >= n {
            break;
        }
        let ks = i;
        while i < n && b[i] > b' ' && b[i] != b'=' && b[i] != b'"' {
            i += 1;
        }
        let key = &line[ks..i];
        let kstart = out.buf.len();
        out.buf.push_str(key);
        let krange = kstart..out.buf.len();
        let vstart = out.buf.len();
        if i < n && b[i] == b'=' {
            i += 1;
            saw_pair = true;
            if i < n && b[i] == b'"' {
                i = unquote_into(line, i + 1, &mut out.buf);
            } else {
                let vs = i;
                while i < n && b[i] > b' ' {
                    i += 1;
                }
                out.buf.push_str(&line[vs..i]);
            }
        } else if i < n && b[i] == b'"' {
            // A quote where a key should be: not logfmt; skip the token.
            while i < n && b[i] > b' ' {
                i += 1;
            }
            out.buf.truncate(kstart);
            continue;
        }
        let vrange = vstart..out.buf.len();
        let dup = out
            .pairs
            .iter()
            .any(|(k, _)| out.buf.get(k.clone()) == Some(key));
        if key.is_empty() || dup {
            out.buf.truncate(kstart);
            continue;
        }
        out.pairs.push((krange, vrange));
    }
    saw_pair && !out.pairs.is_empty()
}

/// Unescape a quoted logfmt value starting just after its opening quote; returns the index
/// after the closing quote (or the line's end).
fn unquote_into(line: &str, mut i: usize, out: &mut String) -> usize {
    let b = line.as_bytes();
    let mut run = i;
    while i < b.len() {
        match b[i] {
            b'"' => {
                out.push_str(&line[run..i]);
                return i + 1;
            }
            b'\\' if i + 1 < b.len() => {
                out.push_str(&line[run..i]);
                let (skip, ch) = match b[i + 1] {
                    b'"' => (2, Some('"')),
                    b'\\' => (2, Some('\\')),
                    b'n' => (2, Some('\n')),
                    b'r' => (2, Some('\r')),
                    b't' => (2, Some('\t')),
                    b'u' => match line
                        .get(i + 2..i + 6)
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .and_then(char::from_u32)
                    {
                        Some(c) => (6, Some(c)),
                        None => (1, None),
                    },
                    _ => (1, None),
                };
                match ch {
                    Some(c) => out.push(c),
                    None => out.push('\\'),
                }
                i += skip;
                run = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(line.get(run..).unwrap_or(""));
    b.len()
}

const UU: u8 = b'u';
const BB: u8 = b'b';
const TT: u8 = b't';
const NN: u8 = b'n';
const FF: u8 = b'f';
const RR: u8 = b'r';
const QU: u8 = b'"';
const BS: u8 = b'\\';
const __: u8 = 0;

/// Per byte: 0 = copy as is, otherwise the escape letter (`u` = `\u00XX`).
static ESCAPE: [u8; 256] = [
    //   1   2   3   4   5   6   7   8   9   A   B   C   D   E   F
    UU, UU, UU, UU, UU, UU, UU, UU, BB, TT, NN, UU, FF, RR, UU, UU, // 0
    UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, UU, // 1
    __, __, QU, __, __, __, __, __, __, __, __, __, __, __, __, __, // 2
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // 3
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // 4
    __, __, __, __, __, __, __, __, __, __, __, __, BS, __, __, __, // 5
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // 6
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // 7
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // 8
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // 9
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // A
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // B
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // C
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // D
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // E
    __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, __, // F
];

/// Append `s` as a JSON string literal (with quotes) to `out`.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        // skip 8 clean bytes at a time
        if let Some(w) = b.get(i..).and_then(|r| r.first_chunk::<8>()) {
            if !needs_escape8(u64::from_le_bytes(*w)) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(b.len());
        while i < end {
            let c = b[i];
            let esc = ESCAPE[c as usize];
            if esc != 0 {
                out.extend_from_slice(&b[start..i]);
                if esc == UU {
                    out.extend_from_slice(&[
                        b'\\',
                        b'u',
                        b'0',
                        b'0',
                        HEX[(c >> 4) as usize],
                        HEX[(c & 0xf) as usize],
                    ]);
                } else {
                    out.extend_from_slice(&[b'\\', esc]);
                }
                start = i + 1;
            }
            i += 1;
        }
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// Whether any of the 8 bytes is a control character, `"` or a backslash (SWAR, exact).
#[inline]
fn needs_escape8(x: u64) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let ctrl = x.wrapping_sub(LO * 0x20) & !x & HI;
    let q = x ^ (LO * u64::from(b'"'));
    let quote = q.wrapping_sub(LO) & !q & HI;
    let bs = x ^ (LO * u64::from(b'\\'));
    let backslash = bs.wrapping_sub(LO) & !bs & HI;
    (ctrl | quote | backslash) != 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    type ScanResult = (
        Result<(), String>,
        Vec<Option<String>>,
        Vec<bool>,
        usize,
        bool,
    );

    fn scan(text: &str, fields: &[&str], labels: &[&str]) -> ScanResult {
        let fields: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let mut vals = FieldVals::default();
        vals.reset(fields.len());
        let mut present = vec![false; labels.len()];
        let mut s = JsonScan {
            fields: &fields,
            label_keys: &labels,
            vals: &mut vals,
            label_present: &mut present,
            n_keys: 0,
            reserved: false,
        };
        let r = scan_json_object(text, &mut s).map_err(|e| e.to_string());
        let (n, reserved) = (s.n_keys, s.reserved);
        let got = (0..fields.len())
            .map(|i| vals.get(i).map(str::to_owned))
            .collect();
        (r, got, present, n, reserved)
    }

    #[test]
    fn format_from_str() {
        assert!(matches!("auto".parse::<Format>(), Ok(Format::Auto)));
        assert!(matches!("JSON".parse::<Format>(), Ok(Format::Json)));
        assert!(matches!("logfmt".parse::<Format>(), Ok(Format::Logfmt)));
        assert!(matches!("raw".parse::<Format>(), Ok(Format::Raw)));
        assert!(matches!("docker".parse::<Format>(), Ok(Format::Docker)));
        assert!(matches!("CRI".parse::<Format>(), Ok(Format::Cri)));
        let f: Format = r"regex:^(?P<level>\w+) (?<msg>.*)$".parse().unwrap();
        assert_eq!(f.to_string(), r"regex:^(?P<level>\w+) (?<msg>.*)$");
        let e = "yaml".parse::<Format>().unwrap_err().to_string();
        assert!(
            e.contains("auto, json, logfmt, raw, docker, cri, regex:<pattern>"),
            "{e}"
        );
        let e = r"regex:(\w+)".parse::<Format>().unwrap_err().to_string();
        assert!(e.contains("no named capture group"), "{e}");
        let e = "regex:(?P<a>".parse::<Format>().unwrap_err().to_string();
        assert!(e.contains("does not compile"), "{e}");
        assert!(matches!(
            "regex:".parse::<Format>(),
            Err(FormatError::EmptyRegex)
        ));
    }

    #[test]
    fn json_scan_extracts_fields() {
        let (r, got, present, n, reserved) = scan(
            r#" {"app":"web","n":42,"f":1.5,"b":true,"z":null,"o":{"app":"x"},"esc":"a\"b\u00e9","host":"h"} "#,
            &["app", "n", "f", "b", "z", "o", "esc", "missing"],
            &["host", "cluster"],
        );
        r.unwrap();
        assert_eq!(n, 8);
        assert!(!reserved);
        assert_eq!(
            got,
            vec![
                Some("web".into()),
                Some("42".into()),
                Some("1.5".into()),
                Some("true".into()),
                None,
                None,
                Some("a\"bé".into()),
                None
            ]
        );
        assert_eq!(present, vec![true, false]);
    }

    #[test]
    fn json_scan_rejects_non_objects() {
        for bad in [
            "[1]",
            "\"s\"",
            "{",
            "{\"a\":1} x",
            "{\"a\":}",
            "",
            "{\"a\":1}{}",
            "nul",
        ] {
            assert!(scan(bad, &[], &[]).0.is_err(), "{bad:?} accepted");
        }
        let (r, _, _, n, _) = scan("{}", &[], &[]);
        r.unwrap();
        assert_eq!(n, 0);
        let (r, _, _, _, reserved) = scan(r#"{"_id":1}"#, &[], &[]);
        r.unwrap();
        assert!(reserved);
    }

    #[test]
    fn rename_reserved_keys() {
        let obj = r#"{ "a" : [1,{"_id":2}], "_id":"x", "b":"}", "\u005fts" : 3 ,"c":{}}"#;
        let mut out = Vec::new();
        copy_object_renaming_reserved(obj, &mut out);
        out.push(b'}');
        let got = String::from_utf8(out).unwrap();
        assert_eq!(
            got,
            r#"{ "a" : [1,{"_id":2}], "_orig_id":"x", "b":"}", "_orig_ts" : 3 ,"c":{}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["_orig_id"], "x");
    }

    #[test]
    fn logfmt_parsing() {
        let mut f = LogfmtFields::default();
        assert!(parse_logfmt(
            r#"level=info msg="hello \"world\"\n" dur=1.5s flag  k=v=w esc="a\qb" u="\u00e9" level=dup =x"#,
            &mut f
        ));
        let got: Vec<(&str, &str)> = f.iter().collect();
        assert_eq!(
            got,
            vec![
                ("level", "info"),
                ("msg", "hello \"world\"\n"),
                ("dur", "1.5s"),
                ("flag", ""),
                ("k", "v=w"),
                ("esc", "a\\qb"),
                ("u", "é"),
            ]
        );
        assert!(!parse_logfmt("just some words", &mut f));
        assert!(parse_logfmt(r#"a="unterminated value"#, &mut f));
        assert_eq!(
            f.iter().collect::<Vec<_>>(),
            vec![("a", "unterminated value")]
        );
        assert!(parse_logfmt("é=ü \"q\"=1 b=2", &mut f));
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![("é", "ü"), ("b", "2")]);
    }

    #[test]
    fn json_escaping() {
        let mut out = Vec::new();
        write_json_str(&mut out, "a\"b\\c\n\u{1}é\u{7f}");
        assert_eq!(out, b"\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\x7f\"".to_vec());
    }

    proptest! {
        #[test]
        fn prop_escape_roundtrip_ascii(s in "[ -~\\n\\t\"\\\\\\x00\\x1f\\x7f]{0,40}") {
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn prop_escape_roundtrip(s in any::<String>()) {
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn prop_logfmt_roundtrip(pairs in proptest::collection::vec(("[a-z_][a-z0-9_.]{0,8}", any::<String>()), 1..6)) {
            // Encode with quoting and escapes, parse back.
            let mut line = String::new();
            let mut seen = std::collections::HashSet::new();
            let mut expect = Vec::new();
            for (k, v) in &pairs {
                line.push_str(k);
                line.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '"' => line.push_str("\\\""),
                        '\\' => line.push_str("\\\\"),
                        '\n' => line.push_str("\\n"),
                        c => line.push(c),
                    }
                }
                line.push_str("\" ");
                if seen.insert(k.clone()) {
                    expect.push((k.clone(), v.clone()));
                }
            }
            let mut f = LogfmtFields::default();
            prop_assert!(parse_logfmt(&line, &mut f));
            let got: Vec<(String, String)> = f.iter().map(|(a, b)| (a.to_owned(), b.to_owned())).collect();
            prop_assert_eq!(got, expect);
        }

        #[test]
        fn prop_logfmt_never_panics(s in any::<String>()) {
            let mut f = LogfmtFields::default();
            let _ = parse_logfmt(&s, &mut f);
            for (k, _) in f.iter() { prop_assert!(!k.is_empty()); }
        }

        #[test]
        fn prop_rename_keeps_valid_json(v in arb_json_object()) {
            let text = serde_json::to_string(&v).unwrap();
            let mut out = Vec::new();
            copy_object_renaming_reserved(&text, &mut out);
            out.push(b'}');
            let back: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(back.len(), v.as_object().unwrap().len());
            for (k, val) in v.as_object().unwrap() {
                let name = if is_reserved(k) { format!("_orig{k}") } else { k.clone() };
                prop_assert_eq!(back.get(&name), Some(val));
            }
        }
    }

    pub(crate) fn arb_json_object() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[^\"]{0,6}|\\PC{0,6}".prop_map(serde_json::Value::String),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z_]{0,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        proptest::collection::btree_map(
            prop_oneof![
                "[a-z_]{1,6}",
                Just("_id".to_string()),
                Just("_ts".to_string()),
                "\\PC{0,4}"
            ],
            value,
            0..6,
        )
        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
    }
}
