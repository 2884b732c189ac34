//! Turning input lines into output records (sans-IO apart from the id block file).
//!
//! Owns: [`RecordSpec`] (format, labels, stream key, limits), [`RecordBuilder`] (one input
//! line → one NDJSON output line in the right stream), [`Accumulator`] (output lines grouped
//! per stream into `wire::StreamChunk`s), [`SeqAllocator`] (record ids that never repeat,
//! even across restarts) and [`InputBatch`] / [`Delivery`] (what inputs hand the pipeline).
//! Must not: read clocks (callers pass `now`), do per-record syscalls or allocations (output
//! bytes are appended to reused buffers), or block.
//!
//! Output record, one line each:
//! ```text
//! {<input fields unchanged>,"_ts":"2024-05-01T12:00:00.123456789Z","_tag":"app",
//!  "_stream":"ns/app","_id":"<collector_id>-<seq>"[,"_truncated":true][,"_invalid_utf8":true]
//!  [,"_parse_error":true],"<label>":"<value>"...}
//! ```
//! - JSON input objects are validated and copied byte for byte (only the closing `}` is
//!   replaced); logfmt/regex input becomes an object of string fields; raw input and lines
//!   that fail to parse become `{"message":"<line>"}` (a failed parse under `json`, `logfmt`
//!   or `regex` adds `_parse_error: true`).
//! - `_ts` is the read time. An input key equal to a metadata name (`_ts`, `_tag`,
//!   `_stream`, `_id`, `_truncated`, `_invalid_utf8`, `_parse_error`) is renamed to
//!   `_orig<name>` so the output never has duplicate keys.
//! - Labels (`--label k=v`) are added as string fields unless the input already has that key:
//!   the input wins.
//! - Invalid UTF-8 is replaced (U+FFFD) and flagged `_invalid_utf8`; a line longer than
//!   `max_record_bytes` is cut at a char boundary and flagged `_truncated` (a cut JSON line
//!   is kept as a raw `message`); whitespace-only lines are skipped; a trailing `\r` is
//!   dropped.
//! - [`RecordBuilder::push_auto`] (container logs, syslog) parses like `auto` whatever the
//!   format, takes the record time from the input, and adds per-record [`Extra`] fields
//!   (input key wins; they replace a `--label` of the same name; the template sees them).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::collector::parse::{
    copy_object_renaming_reserved, is_reserved, parse_logfmt, scan_json_object, write_json_str,
    FieldVals, Format, JsonScan, LogfmtFields,
};
use crate::collector::template::Template;
use crate::wire::StreamChunk;

/// Held by the records of one input read until every batch carrying them is acknowledged.
/// Inputs keep a `Weak` of it: when upgrading fails, everything up to that read is delivered.
#[derive(Debug, Clone, Default)]
pub struct Delivery(pub Arc<()>);

/// What an input hands to the pipeline: records already built, grouped by stream.
#[derive(Debug, Default)]
pub struct InputBatch {
    pub chunks: Vec<StreamChunk>,
    pub records: u64,
    pub bytes: u64,
    pub delivery: Option<Delivery>,
}

/// Default `max_record_bytes`: 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

/// How records are built: shared by every input of a collector.
#[derive(Debug, Clone)]
pub struct RecordSpec {
    /// Prefix of every record id (`<collector_id>-<seq>`).
    pub collector_id: String,
    pub format: Format,
    /// Static labels added to every record (`--label k=v`); the input's own key wins.
    pub labels: Vec<(String, String)>,
    pub stream_key: Template,
    /// Longer input lines are cut and flagged `_truncated`.
    pub max_record_bytes: usize,
}

impl RecordSpec {
    /// Defaults: format auto, no labels, key `{tag}`, 1 MiB records.
    pub fn new(collector_id: impl Into<String>) -> Self {
        RecordSpec {
            collector_id: collector_id.into(),
            format: Format::Auto,
            labels: Vec::new(),
            stream_key: Template::default(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }

    /// Check what the builder relies on; the error says which setting to fix.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.collector_id.is_empty() {
            return Err(SpecError::EmptyCollectorId);
        }
        if self.max_record_bytes < 64 {
            return Err(SpecError::MaxRecordTooSmall(self.max_record_bytes));
        }
        for (i, (k, _)) in self.labels.iter().enumerate() {
            if k.is_empty() {
                return Err(SpecError::EmptyLabelKey);
            }
            if is_reserved(k) {
                return Err(SpecError::ReservedLabel(k.clone()));
            }
            if self.labels[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(SpecError::DuplicateLabel(k.clone()));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("collector id is empty; set --id (it prefixes every record id)")]
    EmptyCollectorId,
    #[error("max record size {0} bytes is too small; use at least 64 (default 1 MiB)")]
    MaxRecordTooSmall(usize),
    #[error("label {0:?} must look like key=value, e.g. --label cluster=prod")]
    BadLabel(String),
    #[error("a label has an empty key; use --label key=value")]
    EmptyLabelKey,
    #[error("label key {0:?} is reserved for record metadata; pick another name")]
    ReservedLabel(String),
    #[error("label key {0:?} is given twice; keep one --label {0}=...")]
    DuplicateLabel(String),
}

/// Parse one `--label k=v`.
pub fn parse_label(s: &str) -> Result<(String, String), SpecError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(SpecError::BadLabel(s.to_owned())),
    }
}

/// Per-record additions for [`RecordBuilder::push_auto`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra<'a> {
    /// String fields added to the record (e.g. `stream`, Kubernetes `pod`/`namespace`) and
    /// visible to the stream-key template. The input's own key wins; they win over a
    /// `--label` of the same name.
    pub fields: &'a [(&'a str, &'a str)],
    /// The input already cut this text: flag `_truncated`.
    pub truncated: bool,
    /// The input could not decode its framing (kept as is): flag `_parse_error`.
    pub parse_error: bool,
}

/// Builds output records from input lines. One per input task (clone it for another);
/// holds reusable scratch buffers, so pushing a line does not allocate.
/// How a record's text is parsed: by `--format`, or forced by the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parse {
    /// As `--format` says.
    Spec,
    /// Like `--format auto` (inputs that decode their own framing: containers, syslog).
    Auto,
    /// A JSON object whatever `--format` says (structured inputs: forward).
    Json,
}

#[derive(Debug, Clone)]
pub struct RecordBuilder {
    spec: Arc<RecordSpec>,
    seq: Arc<SeqAllocator>,
    label_keys: Vec<String>,
    /// `,"k":"v"` per label, pre-escaped; and all of them concatenated.
    label_frags: Vec<Vec<u8>>,
    all_labels: Vec<u8>,
    /// `,"_id":"<escaped collector id>-`
    id_prefix: Vec<u8>,
    /// `(capture group index, name)` for `Format::Regex`.
    regex_names: Vec<(usize, String)>,
    /// Static label count: `label_keys[n_labels..]` are the keys of the current `Extra` fields.
    n_labels: usize,
    locs: Option<regex::CaptureLocations>,
    template_wants_message: Option<usize>,
    // scratch, reused per line
    vals: FieldVals,
    label_present: Vec<bool>,
    utf8: String,
    key: String,
    logfmt: LogfmtFields,
    ts: TsCache,
}

enum Body<'a> {
    Json {
        obj: &'a str,
        empty: bool,
        reserved: bool,
    },
    Logfmt,
    Regex,
    Message {
        parse_error: bool,
    },
}

impl RecordBuilder {
    pub fn new(spec: Arc<RecordSpec>, seq: Arc<SeqAllocator>) -> Result<Self, SpecError> {
        spec.validate()?;
        let label_keys: Vec<String> = spec.labels.iter().map(|(k, _)| k.clone()).collect();
        let label_frags: Vec<Vec<u8>> = spec
            .labels
            .iter()
            .map(|(k, v)| {
                let mut f = vec![b','];
                write_json_str(&mut f, k);
                f.push(b':');
                write_json_str(&mut f, v);
                f
            })
            .collect();
        let all_labels = label_frags.concat();
        let mut id_prefix = b",\"_id\":".to_vec();
        write_json_str(&mut id_prefix, &spec.collector_id);
        id_prefix.pop(); // reopen the string: the sequence number follows
        id_prefix.push(b'-');
        let (regex_names, locs) = match &spec.format {
            Format::Regex(re) => (
                re.capture_names()
                    .enumerate()
                    .filter_map(|(i, n)| n.map(|n| (i, n.to_owned())))
                    .collect(),
                Some(re.capture_locations()),
            ),
            _ => (Vec::new(), None),
        };
        let template_wants_message = spec.stream_key.fields().iter().position(|f| f == "message");
        let n_labels = label_keys.len();
        Ok(RecordBuilder {
            spec,
            seq,
            label_keys,
            label_frags,
            all_labels,
            id_prefix,
            regex_names,
            n_labels,
            locs,
            template_wants_message,
            vals: FieldVals::default(),
            label_present: vec![false; n_labels],
            utf8: String::new(),
            key: String::new(),
            logfmt: LogfmtFields::default(),
            ts: TsCache::default(),
        })
    }

    pub fn spec(&self) -> &Arc<RecordSpec> {
        &self.spec
    }

    /// Build the record for one input line (without its `\n`) and append it to `acc` under
    /// its stream key. Returns false if the line was skipped (empty or whitespace only).
    pub fn push_line(
        &mut self,
        tag: &str,
        line: &[u8],
        now_unix_nanos: i64,
        acc: &mut Accumulator,
    ) -> bool {
        self.push_text(
            tag,
            line,
            Extra::default(),
            Parse::Spec,
            now_unix_nanos,
            acc,
        )
    }

    /// Build the record for an input that is already structured: `obj` is a JSON object
    /// (e.g. converted from msgpack), parsed as JSON whatever `--format` says, and `ts` is
    /// the record's own time (Unix nanoseconds) written as `_ts`. Everything else (limits,
    /// metadata, labels, stream key) is as for [`RecordBuilder::push_line`]; an `obj` that
    /// is not a JSON object is kept as a `message` flagged `_parse_error`.
    pub fn push_object(&mut self, tag: &str, obj: &[u8], ts: i64, acc: &mut Accumulator) -> bool {
        self.push_text(tag, obj, Extra::default(), Parse::Json, ts, acc)
    }

    /// Build a record from `text` parsed like `--format auto` whatever the spec's format (a
    /// JSON object's fields go top level, anything else becomes `message`), with `extra`
    /// fields and flags, and `ts_unix_nanos` as its `_ts`. For inputs that decode their own
    /// framing (container logs, syslog). Text longer than `max_record_bytes` is cut and
    /// flagged like in [`RecordBuilder::push_line`]. Returns false if it was blank.
    pub fn push_auto(
        &mut self,
        tag: &str,
        text: &[u8],
        extra: Extra<'_>,
        ts_unix_nanos: i64,
        acc: &mut Accumulator,
    ) -> bool {
        self.push_text(tag, text, extra, Parse::Auto, ts_unix_nanos, acc)
    }

    fn push_text(
        &mut self,
        tag: &str,
        line: &[u8],
        extra: Extra<'_>,
        parse: Parse,
        now_unix_nanos: i64,
        acc: &mut Accumulator,
    ) -> bool {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            return false;
        }
        let max = self.spec.max_record_bytes;
        let (line, truncated) = if line.len() > max {
            let mut cut = max;
            // back off to a UTF-8 char start (at most 3 continuation bytes)
            while cut > 0 && max - cut < 3 && (line[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            (&line[..cut], true)
        } else {
            (line, false)
        };
        let mut utf8 = std::mem::take(&mut self.utf8);
        let (text, invalid_utf8) = match std::str::from_utf8(line) {
            Ok(s) => (s, false),
            Err(_) => {
                utf8.clear();
                for chunk in line.utf8_chunks() {
                    utf8.push_str(chunk.valid());
                    if !chunk.invalid().is_empty() {
                        utf8.push(char::REPLACEMENT_CHARACTER);
                    }
                }
                (utf8.as_str(), true)
            }
        };
        let truncated = truncated || extra.truncated;
        self.build(
            tag,
            text,
            truncated,
            invalid_utf8,
            extra,
            parse,
            now_unix_nanos,
            acc,
        );
        self.utf8 = utf8;
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        tag: &str,
        text: &str,
        truncated: bool,
        invalid_utf8: bool,
        extra: Extra<'_>,
        parse: Parse,
        now: i64,
        acc: &mut Accumulator,
    ) {
        self.sync_extra_keys(extra.fields);
        let n_labels = self.n_labels;
        let fields = self.spec.stream_key.fields();
        self.vals.reset(fields.len());
        self.label_present.iter_mut().for_each(|p| *p = false);
        let spec = &*self.spec;

        let format = match parse {
            Parse::Spec => &spec.format,
            Parse::Auto => &Format::Auto,
            Parse::Json => &Format::Json,
        };
        let body = match format {
            Format::Auto | Format::Json | Format::Docker | Format::Cri => {
                let json = if truncated {
                    None
                } else {
                    scan_json(
                        text,
                        fields,
                        &self.label_keys,
                        &mut self.vals,
                        &mut self.label_present,
                    )
                };
                json.unwrap_or(Body::Message {
                    // a truncated line is not a parse error: it was cut on purpose
                    parse_error: matches!(format, Format::Json) && !truncated,
                })
            }
            Format::Raw => Body::Message { parse_error: false },
            Format::Logfmt => {
                if parse_logfmt(text, &mut self.logfmt) {
                    for (k, v) in self.logfmt.iter() {
                        note_field(
                            fields,
                            &self.label_keys,
                            &mut self.vals,
                            &mut self.label_present,
                            k,
                            v,
                        );
                    }
                    Body::Logfmt
                } else {
                    Body::Message { parse_error: true }
                }
            }
            Format::Regex(re) => {
                let matched = match self.locs.as_mut() {
                    Some(locs) => re.captures_read(locs, text).is_some(),
                    None => false,
                };
                if matched {
                    if let Some(locs) = &self.locs {
                        for (gi, name) in &self.regex_names {
                            if let Some((s, e)) = locs.get(*gi) {
                                let v = text.get(s..e).unwrap_or("");
                                note_field(
                                    fields,
                                    &self.label_keys,
                                    &mut self.vals,
                                    &mut self.label_present,
                                    name,
                                    v,
                                );
                            }
                        }
                    }
                    Body::Regex
                } else {
                    Body::Message { parse_error: true }
                }
            }
        };
        if let Body::Message { .. } = body {
            if let Some(i) = self.template_wants_message {
                self.vals.set(i, text);
            }
            if let Some(i) = self.label_keys.iter().position(|k| k == "message") {
                self.label_present[i] = true;
            }
        }

        for (j, (k, v)) in extra.fields.iter().enumerate() {
            if self.label_present[n_labels + j] {
                continue; // the input has its own
            }
            if let Some(fi) = fields.iter().position(|f| f == k) {
                self.vals.set(fi, v);
            }
            if let Some(i) = self.label_keys[..n_labels].iter().position(|l| l == k) {
                self.label_present[i] = true; // the extra field replaces the static label
            }
        }

        self.key.clear();
        let vals = &self.vals;
        spec.stream_key.render(tag, |i| vals.get(i), &mut self.key);

        let chunk = acc.chunk_mut(&self.key);
        let out = &mut chunk.data;
        let start = out.len();
        let mut has_fields = true;
        let mut parse_error = false;
        match body {
            Body::Json {
                obj,
                empty,
                reserved,
            } => {
                if reserved {
                    copy_object_renaming_reserved(obj, out);
                } else {
                    out.extend_from_slice(&obj.as_bytes()[..obj.len() - 1]);
                }
                has_fields = !empty;
            }
            Body::Message { parse_error: pe } => {
                parse_error = pe;
                out.extend_from_slice(b"{\"message\":");
                write_json_str(out, text);
            }
            Body::Logfmt => {
                out.push(b'{');
                for (i, (k, v)) in self.logfmt.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json_key(out, k);
                    write_json_str(out, v);
                }
                has_fields = !self.logfmt.is_empty();
            }
            Body::Regex => {
                out.push(b'{');
                has_fields = false;
                if let Some(locs) = &self.locs {
                    for (gi, name) in &self.regex_names {
                        if let Some((s, e)) = locs.get(*gi) {
                            if has_fields {
                                out.push(b',');
                            }
                            write_json_key(out, name);
                            write_json_str(out, text.get(s..e).unwrap_or(""));
                            has_fields = true;
                        }
                    }
                }
            }
        }
        // metadata
        if has_fields {
            out.push(b',');
        }
        out.extend_from_slice(b"\"_ts\":\"");
        self.ts.write(out, now);
        out.extend_from_slice(b"\",\"_tag\":");
        write_json_str(out, tag);
        out.extend_from_slice(b",\"_stream\":");
        write_json_str(out, &self.key);
        out.extend_from_slice(&self.id_prefix);
        write_u64(out, self.seq.next());
        out.push(b'"');
        if truncated {
            out.extend_from_slice(b",\"_truncated\":true");
        }
        if invalid_utf8 {
            out.extend_from_slice(b",\"_invalid_utf8\":true");
        }
        if parse_error || extra.parse_error {
            out.extend_from_slice(b",\"_parse_error\":true");
        }
        if self.label_present.iter().any(|p| *p) {
            for (frag, present) in self.label_frags.iter().zip(&self.label_present) {
                if !present {
                    out.extend_from_slice(frag);
                }
            }
        } else {
            out.extend_from_slice(&self.all_labels);
        }
        for (j, (k, v)) in extra.fields.iter().enumerate() {
            if !self.label_present[n_labels + j] {
                out.push(b',');
                write_json_str(out, k);
                out.push(b':');
                write_json_str(out, v);
            }
        }
        out.extend_from_slice(b"}\n");
        let written = out.len() - start;
        chunk.count += 1;
        acc.records += 1;
        acc.bytes += written as u64;
    }
}

impl RecordBuilder {
    /// Make `label_keys[n_labels..]` the keys of `extra` (usually already so: no allocation).
    fn sync_extra_keys(&mut self, extra: &[(&str, &str)]) {
        let n = self.n_labels;
        let same = self.label_keys.len() == n + extra.len()
            && self.label_keys[n..]
                .iter()
                .zip(extra)
                .all(|(a, (b, _))| a == b);
        if !same {
            self.label_keys.truncate(n);
            self.label_keys
                .extend(extra.iter().map(|(k, _)| (*k).to_owned()));
            self.label_present.resize(self.label_keys.len(), false);
        }
    }
}

/// The line as a JSON object, or None (and no field noted) if it is not one.
fn scan_json<'t>(
    text: &'t str,
    fields: &[String],
    label_keys: &[String],
    vals: &mut FieldVals,
    present: &mut [bool],
) -> Option<Body<'t>> {
    let obj = text.trim_ascii();
    if !obj.starts_with('{') {
        return None;
    }
    let mut scan = JsonScan {
        fields,
        label_keys,
        vals,
        label_present: present,
        n_keys: 0,
        reserved: false,
    };
    match scan_json_object(obj, &mut scan) {
        Ok(()) => Some(Body::Json {
            obj,
            empty: scan.n_keys == 0,
            reserved: scan.reserved,
        }),
        Err(_) => {
            vals.reset(fields.len());
            present.iter_mut().for_each(|p| *p = false);
            None
        }
    }
}

fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Record a parsed field: its value if the template needs it, its presence if it is a label.
fn note_field(
    fields: &[String],
    label_keys: &[String],
    vals: &mut FieldVals,
    present: &mut [bool],
    k: &str,
    v: &str,
) {
    if let Some(i) = fields.iter().position(|f| f == k) {
        vals.set(i, v);
    }
    if let Some(i) = label_keys.iter().position(|l| l == k) {
        present[i] = true;
    }
}

/// Write `"key":`, renaming a metadata name to `_orig<key>`.
fn write_json_key(out: &mut Vec<u8>, k: &str) {
    if is_reserved(k) {
        let mut renamed = String::with_capacity(k.len() + 5);
        renamed.push_str(crate::collector::parse::RENAMED_PREFIX);
        renamed.push_str(k);
        write_json_str(out, &renamed);
    } else {
        write_json_str(out, k);
    }
    out.push(b':');
}

/// RFC 3339 UTC timestamps with nanoseconds; the date/time part is cached per second.
#[derive(Debug, Clone, Default)]
struct TsCache {
    secs: Option<i64>,
    prefix: [u8; 20], // "YYYY-MM-DDTHH:MM:SS."
}

impl TsCache {
    fn write(&mut self, out: &mut Vec<u8>, unix_nanos: i64) {
        let secs = unix_nanos.div_euclid(1_000_000_000);
        let nanos = unix_nanos.rem_euclid(1_000_000_000) as u32;
        if self.secs != Some(secs) {
            self.prefix = format_secs(secs);
            self.secs = Some(secs);
        }
        out.extend_from_slice(&self.prefix);
        let mut frac = [b'0'; 9];
        let mut n = nanos;
        for d in frac.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&frac);
        out.push(b'Z');
    }
}

fn format_secs(secs: i64) -> [u8; 20] {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // civil_from_days (H. Hinnant), valid for the whole i64-nanosecond range
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut b = *b"0000-00-00T00:00:00.";
    let put = |b: &mut [u8; 20], at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(&mut b, 0, 4, y.clamp(0, 9999));
    put(&mut b, 5, 2, m);
    put(&mut b, 8, 2, d);
    put(&mut b, 11, 2, sod / 3600);
    put(&mut b, 14, 2, sod / 60 % 60);
    put(&mut b, 17, 2, sod % 60);
    b
}

/// Wall clock as Unix nanoseconds (for inputs; the builder itself never reads the clock).
pub fn unix_nanos_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Output lines of one input read, grouped by stream key. Reused between reads.
#[derive(Debug, Default)]
pub struct Accumulator {
    index: HashMap<String, usize>,
    chunks: Vec<StreamChunk>,
    last: Option<usize>,
    records: u64,
    bytes: u64,
    /// Expected data size of a new chunk (from the previous batch).
    cap_hint: usize,
}

impl Accumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records accumulated since the last take.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Output bytes accumulated since the last take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The chunk for `key`, created empty if needed.
    pub fn chunk_mut(&mut self, key: &str) -> &mut StreamChunk {
        let idx = match self.last {
            Some(i) if self.chunks[i].key == key => i,
            _ => match self.index.get(key) {
                Some(&i) => i,
                None => {
                    let i = self.chunks.len();
                    self.chunks.push(StreamChunk {
                        key: key.to_owned(),
                        count: 0,
                        data: Vec::with_capacity(self.cap_hint),
                    });
                    self.index.insert(key.to_owned(), i);
                    i
                }
            },
        };
        self.last = Some(idx);
        &mut self.chunks[idx]
    }

    /// Hand out everything accumulated and start afresh (the key index keeps its capacity).
    pub fn take(&mut self) -> Vec<StreamChunk> {
        if let Some(max) = self.chunks.iter().map(|c| c.data.len()).max() {
            self.cap_hint = max.min(1 << 20);
        }
        self.index.clear();
        self.last = None;
        self.records = 0;
        self.bytes = 0;
        std::mem::take(&mut self.chunks)
    }

    /// [`Accumulator::take`] as an [`InputBatch`] carrying `delivery`.
    pub fn take_batch(&mut self, delivery: Option<Delivery>) -> InputBatch {
        let (records, bytes) = (self.records, self.bytes);
        InputBatch {
            chunks: self.take(),
            records,
            bytes,
            delivery,
        }
    }

    pub fn into_input_batch(mut self, delivery: Option<Delivery>) -> InputBatch {
        self.take_batch(delivery)
    }
}

/// Ids reserved per write of the `seq` file.
pub const SEQ_BLOCK: u64 = 1 << 20;
const SEQ_FILE: &str = "seq";

#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    #[error("cannot use data dir {path}: {source}; check that it exists and is writable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "record id file {path} is corrupt ({content:?}); restore it, or delete it only if \
         duplicate record ids after this restart are acceptable"
    )]
    Corrupt { path: PathBuf, content: String },
}

/// Monotonic record sequence numbers shared by all inputs, never reused across restarts:
/// ids are handed out from blocks whose end is persisted (temp file + fsync + rename) before
/// any id of the block is used; a restart starts after the last persisted block end.
#[derive(Debug)]
pub struct SeqAllocator {
    next: AtomicU64,
    limit: AtomicU64,
    block: u64,
    path: PathBuf,
    lock: Mutex<()>,
    persist_failures: AtomicU64,
}

impl SeqAllocator {
    /// Open (or create) `<data_dir>/seq` and reserve the first block.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>, SeqError> {
        Self::open_with_block(data_dir, SEQ_BLOCK)
    }

    pub fn open_with_block(data_dir: &Path, block: u64) -> Result<Arc<Self>, SeqError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SeqError::Io { path, source }
        };
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let path = data_dir.join(SEQ_FILE);
        let start = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| SeqError::Corrupt {
                path: path.clone(),
                content: s.chars().take(40).collect(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(io(&path)(e)),
        };
        let block = block.max(1);
        let limit = start.saturating_add(block);
        persist_seq(&path, limit).map_err(io(&path))?;
        Ok(Arc::new(SeqAllocator {
            next: AtomicU64::new(start),
            limit: AtomicU64::new(limit),
            block,
            path,
            lock: Mutex::new(()),
            persist_failures: AtomicU64::new(0),
        }))
    }

    /// The next id. Lock-free except once per block, when the new block end is persisted.
    pub fn next(&self) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if id < self.limit.load(Ordering::Acquire) {
            return id;
        }
        self.extend_past(id);
        id
    }

    fn extend_past(&self, id: u64) {
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = self.limit.load(Ordering::Acquire);
        if id < limit {
            return;
        }
        let mut new = limit;
        while new <= id {
            new = new.saturating_add(self.block);
        }
        if let Err(e) = persist_seq(&self.path, new) {
            self.persist_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                path = %self.path.display(),
                error = %e,
                "cannot persist the record id block; ids may repeat after a restart"
            );
        }
        self.limit.store(new, Ordering::Release);
    }

    /// How many block reservations failed to persist (ids may repeat after a restart).
    pub fn persist_failures(&self) -> u64 {
        self.persist_failures.load(Ordering::Relaxed)
    }
}

fn persist_seq(path: &Path, limit: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{limit}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // make the rename durable; not all platforms can open a directory
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
