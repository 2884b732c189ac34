//! `[[sink]]` tables of the aggregator's config file, their validation (every problem named
//! by its key, e.g. `sink[1].url`, counting from 0), and the routing wrapper.
//!
//! ```toml
//! [[sink]]
//! type = "http"              # file | http | postgres | nats | stdout
//! name = "search"            # unique; default = the type; names the checkpoint
//! match_stream = "^prod/"    # optional regex on the stream key
//! match_tag = "^(nginx|app)$" # optional regex on the record's _tag (both must match if both are set)
//! url = "https://logs.example.com/ingest"
//! ```
//! Per type: `file`: `dir` (default --out-dir), `max_open`; `http`: `url`, `headers`
//! (table), `timeout`, `gzip`, `ca`, `max_request_bytes`, `concurrency`; `postgres`: `dsn`,
//! `table`, `create_table`, `timeout`; `nats`: `url`, `subject`, `stream`, `create_stream`,
//! `stream_subjects`, `dedupe`, `timeout`, `user`, `password`, `token`; `stdout`: nothing.
//! `-` and `_` are the same in keys. Without any `[[sink]]` the aggregator has one file sink
//! named `file` under --out-dir.
//!
//! Routing happens in [`Routed`], a [`Sink`] wrapping the real one, so the store is unchanged:
//! streams whose key does not match are dropped from the batch, records whose `_tag` does not
//! match are dropped from their stream ([`route_batch`], sans-IO); a batch left empty is
//! acknowledged without calling the inner sink. This module does no I/O besides building
//! the sinks.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use super::http::{HttpSink, HttpSinkConfig};
use super::nats::{check_template, NatsSink, NatsSinkConfig};
use super::postgres::{quote_table, PostgresSink, PostgresSinkConfig};
use super::stdout::StdoutSink;
use super::{FileSink, Sink, SinkBatch, SinkError, SinkFuture, SinkStream};
use crate::config::{parse_duration, ConfigErrors};

/// Which records a sink takes.
#[derive(Debug, Clone, Default)]
pub struct Route {
    pub stream: Option<Regex>,
    pub tag: Option<Regex>,
}

impl Route {
    pub fn is_all(&self) -> bool {
        self.stream.is_none() && self.tag.is_none()
    }
}

/// What kind of sink, with its settings.
#[derive(Debug, Clone)]
pub enum SinkKind {
    File { dir: PathBuf, max_open: usize },
    Http(HttpSinkConfig),
    Postgres(PostgresSinkConfig),
    Nats(NatsSinkConfig),
    Stdout,
}

/// One validated `[[sink]]` table.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub name: String,
    pub route: Route,
    pub kind: SinkKind,
}

/// The sinks used when the config file has no `[[sink]]`: one file sink under `out_dir`.
pub fn default_sinks(out_dir: &Path) -> Vec<SinkSpec> {
    vec![SinkSpec {
        name: "file".into(),
        route: Route::default(),
        kind: SinkKind::File {
            dir: out_dir.to_path_buf(),
            max_open: super::file::DEFAULT_MAX_OPEN,
        },
    }]
}

const COMMON: &[&str] = &["type", "name", "match_stream", "match_tag"];

fn allowed(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "file" => &["dir", "max_open"],
        "http" => &[
            "url",
            "headers",
            "timeout",
            "gzip",
            "ca",
            "max_request_bytes",
            "concurrency",
        ],
        "postgres" => &["dsn", "table", "create_table", "timeout"],
        "nats" => &[
            "url",
            "subject",
            "stream",
            "create_stream",
            "stream_subjects",
            "dedupe",
            "timeout",
            "user",
            "password",
            "token",
        ],
        "stdout" => &[],
        _ => return None,
    })
}

/// Reads the typed values of one table, recording errors under `sink[i].<key>`.
struct Table<'a> {
    prefix: String,
    t: BTreeMap<String, &'a toml::Value>,
    errs: &'a mut ConfigErrors,
}

impl Table<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }
    fn err(&mut self, k: &str, msg: impl Into<String>) {
        let key = self.key(k);
        self.errs.push(&key, msg);
    }
    fn str(&mut self, k: &str) -> Option<String> {
        match self.t.get(k) {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(k, "must be a string");
                None
            }
        }
    }
    fn bool(&mut self, k: &str, default: bool) -> bool {
        match self.t.get(k) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                self.err(k, "must be true or false");
                default
            }
        }
    }
    fn usize(&mut self, k: &str, default: usize, min: usize) -> usize {
        match self.t.get(k) {
            None => default,
            Some(toml::Value::Integer(n)) if *n >= min as i64 => *n as usize,
            Some(_) => {
                self.err(k, format!("must be an integer of at least {min}"));
                default
            }
        }
    }
    fn duration(&mut self, k: &str, default: Duration) -> Duration {
        let d = match self.t.get(k) {
            None => return default,
            Some(toml::Value::String(s)) => parse_duration(s),
            Some(toml::Value::Integer(n)) if *n > 0 => Ok(Duration::from_secs(*n as u64)),
            Some(toml::Value::Float(f)) if *f > 0.0 && f.is_finite() => {
                Ok(Duration::from_secs_f64(*f))
            }
            Some(_) => Err("must be a duration such as \"10s\" or a number of seconds".into()),
        };
        match d {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(k, "must be more than zero");
                default
            }
            Err(e) => {
                self.err(k, e);
                default
            }
        }
    }
    fn regex(&mut self, k: &str) -> Option<Regex> {
        let s = self.str(k)?;
        match Regex::new(&s) {
            Ok(r) => Some(r),
            Err(e) => {
                self.err(k, format!("{s:?} is not a valid regular expression: {e}"));
                None
            }
        }
    }
    fn required(&mut self, k: &str, what: &str) -> String {
        match self.str(k) {
            Some(s) if !s.trim().is_empty() => s,
            Some(_) => {
                self.err(k, format!("must not be empty ({what})"));
                String::new()
            }
            None => {
                if !self.t.contains_key(k) {
                    self.err(k, format!("is required: {what}"));
                }
                String::new()
            }
        }
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 100
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parse the `sink` value of a config file (an array of tables). `None` gives
/// [`default_sinks`]. `out_dir` is the default `dir` of file sinks; `node_id` keys the
/// PostgreSQL positions.
pub fn parse_sinks(
    value: Option<&toml::Value>,
    out_dir: &Path,
    node_id: &str,
) -> Result<Vec<SinkSpec>, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let tables = match value {
        None => return Ok(default_sinks(out_dir)),
        Some(toml::Value::Array(a)) => a,
        Some(_) => {
            errs.push(
                "sink",
                "must be an array of tables: write each sink as a [[sink]] table",
            );
            return Err(errs);
        }
    };
    if tables.is_empty() {
        errs.push(
            "sink",
            "no sink configured: add at least one [[sink]] table",
        );
        return Err(errs);
    }
    let mut specs: Vec<SinkSpec> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut file_dirs: Vec<(PathBuf, usize)> = Vec::new();
    for (i, v) in tables.iter().enumerate() {
        let prefix = format!("sink[{i}]");
        let toml::Value::Table(raw) = v else {
            errs.push(&prefix, "must be a table ([[sink]])");
            continue;
        };
        let t: BTreeMap<String, &toml::Value> =
            raw.iter().map(|(k, v)| (k.replace('-', "_"), v)).collect();
        let mut tb = Table {
            prefix: prefix.clone(),
            t,
            errs: &mut errs,
        };
        let kind_name = match tb.str("type") {
            Some(k) => k,
            None => {
                if !tb.t.contains_key("type") {
                    tb.err(
                        "type",
                        "is required: one of file, http, postgres, nats, stdout",
                    );
                }
                continue;
            }
        };
        let Some(extra) = allowed(&kind_name) else {
            tb.err(
                "type",
                format!("unknown sink type {kind_name:?}: expected file, http, postgres, nats or stdout"),
            );
            continue;
        };
        let unknown: Vec<String> =
            tb.t.keys()
                .filter(|k| !COMMON.contains(&k.as_str()) && !extra.contains(&k.as_str()))
                .cloned()
                .collect();
        for k in unknown {
            let mut keys: Vec<&str> = COMMON.to_vec();
            keys.extend_from_slice(extra);
            tb.err(
                &k,
                format!(
                    "unknown key for a {kind_name} sink (known: {})",
                    keys.join(", ")
                ),
            );
        }
        let name = tb.str("name").unwrap_or_else(|| kind_name.clone());
        if !valid_name(&name) {
            tb.err(
                "name",
                format!(
                    "{name:?} must be 1-100 characters of [A-Za-z0-9._-], not starting with '.'"
                ),
            );
        } else if let Some(j) = names.iter().position(|n| *n == name) {
            tb.err(
                "name",
                format!("{name:?} is already the name of sink[{j}]; give each sink a unique name"),
            );
        }
        names.push(name.clone());
        let route = Route {
            stream: tb.regex("match_stream"),
            tag: tb.regex("match_tag"),
        };
        let timeout = tb.duration("timeout", Duration::from_secs(30));
        let kind = match kind_name.as_str() {
            "file" => {
                let dir = tb
                    .str("dir")
                    .map_or_else(|| out_dir.to_path_buf(), PathBuf::from);
                if let Some((_, j)) = file_dirs.iter().find(|(d, _)| *d == dir) {
                    tb.err(
                        "dir",
                        format!(
                            "{} is already used by sink[{j}]; two file sinks need different directories",
                            dir.display()
                        ),
                    );
                }
                file_dirs.push((dir.clone(), i));
                let max_open = tb.usize("max_open", super::file::DEFAULT_MAX_OPEN, 1);
                SinkKind::File { dir, max_open }
            }
            "http" => {
                let url = tb.required("url", "the URL records are POSTed to");
                let mut c = HttpSinkConfig::new(name.clone(), url.clone());
                if !url.is_empty() {
                    match url.parse::<hyper::Uri>() {
                        Ok(u)
                            if matches!(u.scheme_str(), Some("http" | "https"))
                                && u.host().is_some() => {}
                        Ok(_) => tb.err(
                            "url",
                            format!("{url:?} must be an http:// or https:// URL with a host"),
                        ),
                        Err(e) => tb.err("url", format!("{url:?} is not a valid URL: {e}")),
                    }
                }
                match tb.t.get("headers").copied() {
                    None => {}
                    Some(toml::Value::Table(h)) => {
                        for (k, v) in h.clone() {
                            let ok_name =
                                hyper::header::HeaderName::from_bytes(k.as_bytes()).is_ok();
                            match v {
                                toml::Value::String(s)
                                    if ok_name && hyper::header::HeaderValue::from_str(&s).is_ok() =>
                                {
                                    c.headers.insert(k, s);
                                }
                                _ => tb.err(
                                    &format!("headers.{k}"),
                                    "must be a valid header name with a string value of visible characters",
                                ),
                            }
                        }
                    }
                    Some(_) => tb.err("headers", "must be a table of NAME = \"value\""),
                }
                c.timeout = timeout;
                c.gzip = tb.bool("gzip", false);
                c.ca = tb.str("ca").map(PathBuf::from);
                if let Some(ca) = &c.ca {
                    if !ca.is_file() {
                        let msg = format!("{} is not a readable file", ca.display());
                        tb.err("ca", msg);
                    }
                }
                c.max_request_bytes = tb.usize("max_request_bytes", c.max_request_bytes, 1024);
                c.concurrency = tb.usize("concurrency", c.concurrency, 1);
                SinkKind::Http(c)
            }
            "postgres" => {
                let dsn = tb.required(
                    "dsn",
                    "a connection string such as \"host=127.0.0.1 port=5432 user=logs dbname=logs\"",
                );
                if !dsn.is_empty() {
                    if let Err(e) = dsn.parse::<tokio_postgres::Config>() {
                        tb.err(
                            "dsn",
                            format!("is not a valid PostgreSQL connection string: {e}"),
                        );
                    }
                }
                let mut c = PostgresSinkConfig::new(name.clone(), dsn, node_id);
                if let Some(table) = tb.str("table") {
                    if let Err(e) = quote_table(&table) {
                        tb.err("table", e);
                    }
                    c.table = table;
                }
                c.create_table = tb.bool("create_table", true);
                c.timeout = timeout;
                SinkKind::Postgres(c)
            }
            "nats" => {
                let url = tb.required("url", "the NATS server, e.g. \"nats://127.0.0.1:4222\"");
                let mut c = NatsSinkConfig::new(name.clone(), url);
                if let Some(s) = tb.str("subject") {
                    c.subject = s;
                }
                c.stream = tb.str("stream");
                c.create_stream = tb.bool("create_stream", true);
                match tb.t.get("stream_subjects").copied() {
                    None => {}
                    Some(toml::Value::Array(a)) => {
                        for s in a.clone() {
                            match s {
                                toml::Value::String(s) if !s.is_empty() => {
                                    c.stream_subjects.push(s)
                                }
                                _ => {
                                    tb.err("stream_subjects", "must be a list of non-empty strings")
                                }
                            }
                        }
                    }
                    Some(_) => tb.err("stream_subjects", "must be a list of subjects"),
                }
                match check_template(&c.subject) {
                    Err(e) if c.stream_subjects.is_empty() || !e.starts_with("cannot derive") => {
                        tb.err("subject", e)
                    }
                    _ => {}
                }
                if let Some(s) = &c.stream {
                    if s.is_empty()
                        || s.chars()
                            .any(|ch| ch.is_whitespace() || ".*>/\\".contains(ch))
                    {
                        tb.err("stream", format!("{s:?} is not a valid JetStream stream name (no spaces, '.', '*', '>', '/' or '\\\\')"));
                    }
                }
                c.dedupe = tb.bool("dedupe", true);
                c.timeout = timeout;
                c.user = tb.str("user");
                c.password = tb.str("password");
                c.token = tb.str("token");
                if c.user.is_some() != c.password.is_some() {
                    tb.err("user", "user and password go together");
                }
                SinkKind::Nats(c)
            }
            _ => SinkKind::Stdout,
        };
        specs.push(SinkSpec { name, route, kind });
    }
    errs.into_result(specs)
}

/// Build the sinks (routing-wrapped where a rule is set). Nothing connects yet: each sink
/// connects in its `open`, retried by the store.
pub fn build_sinks(specs: &[SinkSpec]) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    let mut out: Vec<Box<dyn Sink>> = Vec::with_capacity(specs.len());
    for s in specs {
        let inner: Box<dyn Sink> = match &s.kind {
            SinkKind::File { dir, max_open } => Box::new(
                FileSink::new(dir)
                    .map_err(|e| {
                        SinkError::Other(format!(
                            "sink {}: cannot use {}: {e}",
                            s.name,
                            dir.display()
                        ))
                    })?
                    .with_name(s.name.clone())
                    .with_max_open(*max_open),
            ),
            SinkKind::Http(c) => Box::new(HttpSink::new(c.clone()).map_err(|e| named(&s.name, e))?),
            SinkKind::Postgres(c) => {
                Box::new(PostgresSink::new(c.clone()).map_err(|e| named(&s.name, e))?)
            }
            SinkKind::Nats(c) => Box::new(NatsSink::new(c.clone()).map_err(|e| named(&s.name, e))?),
            SinkKind::Stdout => Box::new(StdoutSink::new(s.name.clone())),
        };
        if s.route.is_all() {
            out.push(inner);
        } else {
            out.push(Box::new(Routed::new(inner, s.route.clone())));
        }
    }
    Ok(out)
}

fn named(name: &str, e: SinkError) -> SinkError {
    SinkError::Other(format!("sink {name}: {e}"))
}

/// The record's `_tag` (the last top-level `"_tag":"…"` of the JSON line), unescaped.
pub fn record_tag(line: &[u8]) -> Option<Cow<'_, str>> {
    const KEY: &[u8] = b"\"_tag\":\"";
    let at = memchr::memmem::rfind(line, KEY)? + KEY.len();
    let rest = &line[at..];
    let mut i = 0;
    let mut escaped = false;
    while i < rest.len() {
        match rest[i] {
            b'\\' => {
                escaped = true;
                i += 2;
            }
            b'"' => {
                if !escaped {
                    return std::str::from_utf8(&rest[..i]).ok().map(Cow::Borrowed);
                }
                // include the quotes and let serde_json undo the escapes
                return serde_json::from_slice::<String>(&line[at - 1..at + i + 1])
                    .ok()
                    .map(Cow::Owned);
            }
            _ => i += 1,
        }
    }
    None
}

/// Remembers the last tag's verdict (tags repeat a lot within a stream).
struct TagMemo<'r> {
    re: &'r Regex,
    last: String,
    verdict: bool,
    valid: bool,
}

impl TagMemo<'_> {
    fn matches(&mut self, line: &[u8]) -> bool {
        let Some(tag) = record_tag(line) else {
            return false;
        };
        if !(self.valid && self.last == *tag) {
            self.verdict = self.re.is_match(&tag);
            self.last.clear();
            self.last.push_str(&tag);
            self.valid = true;
        }
        self.verdict
    }
}

/// The part of `batch` that `route` takes; `None` when that is all of it (use the batch as
/// is). Sequences are kept, so the result may have no records at all.
pub fn route_batch(batch: &SinkBatch, route: &Route) -> Option<SinkBatch> {
    if route.is_all() {
        return None;
    }
    // First pass: the kept line ranges per stream (None: the whole stream).
    let mut memo = route.tag.as_ref().map(|re| TagMemo {
        re,
        last: String::new(),
        verdict: false,
        valid: false,
    });
    let mut plan: Vec<Option<Vec<std::ops::Range<usize>>>> =
        Vec::with_capacity(batch.streams.len());
    let mut changed = false;
    for s in &batch.streams {
        if route.stream.as_ref().is_some_and(|re| !re.is_match(&s.key)) {
            plan.push(Some(Vec::new()));
            changed = true;
            continue;
        }
        let Some(memo) = memo.as_mut() else {
            plan.push(None);
            continue;
        };
        let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
        let mut all = true;
        let mut start = 0;
        while start < s.data.len() {
            let end =
                memchr::memchr(b'\n', &s.data[start..]).map_or(s.data.len(), |i| start + i + 1);
            if memo.matches(&s.data[start..end]) {
                match kept.last_mut() {
                    Some(r) if r.end == start => r.end = end,
                    _ => kept.push(start..end),
                }
            } else {
                all = false;
            }
            start = end;
        }
        if all {
            plan.push(None);
        } else {
            changed = true;
            plan.push(Some(kept));
        }
    }
    if !changed {
        return None;
    }
    let mut out = SinkBatch {
        first_seq: batch.first_seq,
        last_seq: batch.last_seq,
        records: 0,
        streams: Vec::new(),
        partial: batch.partial,
    };
    for (s, p) in batch.streams.iter().zip(plan) {
        let stream = match p {
            None => s.clone(),
            Some(ranges) => {
                let mut data = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum());
                for r in ranges {
                    data.extend_from_slice(&s.data[r]);
                }
                let count = data.iter().filter(|b| **b == b'\n').count() as u64
                    + u64::from(!data.is_empty() && !data.ends_with(b"\n"));
                SinkStream {
                    key: s.key.clone(),
                    count,
                    data,
                }
            }
        };
        if stream.count > 0 {
            out.records += stream.count;
            out.streams.push(stream);
        }
    }
    Some(out)
}

/// A sink that passes on only what its [`Route`] takes.
pub struct Routed {
    inner: Box<dyn Sink>,
    route: Arc<Route>,
}

impl Routed {
    pub fn new(inner: Box<dyn Sink>, route: Route) -> Routed {
        Routed {
            inner,
            route: Arc::new(route),
        }
    }
}

impl Sink for Routed {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn open(&mut self) -> SinkFuture<'_, Option<u64>> {
        self.inner.open()
    }

    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let routed = if self.route.tag.is_some() && batch.bytes() > (256 << 10) {
                // Scanning every record is CPU work: keep big batches off the async workers.
                let (b, r) = (batch.clone(), self.route.clone());
                tokio::task::spawn_blocking(move || route_batch(&b, &r))
                    .await
                    .map_err(|e| SinkError::Other(format!("routing task failed: {e}")))?
            } else {
                route_batch(&batch, &self.route)
            };
            match routed {
                None => self.inner.write(batch).await,
                Some(b) if b.records == 0 => Ok(()),
                Some(b) => self.inner.write(Arc::new(b)).await,
            }
        })
    }

    fn close(&mut self) -> SinkFuture<'_, ()> {
        self.inner.close()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<Vec<SinkSpec>, ConfigErrors> {
        let t: toml::Table = text.parse().unwrap();
        parse_sinks(t.get("sink"), Path::new("/tmp/out"), "agg-1")
    }

    fn keys(e: &ConfigErrors) -> Vec<String> {
        e.0.iter().map(|e| e.key.clone()).collect()
    }

    #[test]
    fn default_is_one_file_sink() {
        let s = parse("").unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "file");
        assert!(matches!(&s[0].kind, SinkKind::File { dir, .. } if dir == Path::new("/tmp/out")));
    }

    #[test]
    fn full_config() {
        let s = parse(
            r#"
[[sink]]
type = "file"
[[sink]]
type = "http"
url = "http://127.0.0.1:9/in"
headers = { Authorization = "Bearer x" }
timeout = "5s"
gzip = true
match-stream = "^prod/"
[[sink]]
type = "postgres"
name = "pg"
dsn = "host=127.0.0.1 port=5432 user=postgres"
table = "app.logs"
[[sink]]
type = "nats"
url = "nats://127.0.0.1:4222"
stream = "LOGS"
match_tag = "^web$"
[[sink]]
type = "stdout"
"#,
        )
        .unwrap();
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["file", "http", "pg", "nats", "stdout"]);
        let SinkKind::Http(h) = &s[1].kind else {
            panic!()
        };
        assert_eq!(h.timeout, Duration::from_secs(5));
        assert!(h.gzip);
        assert_eq!(h.headers["Authorization"], "Bearer x");
        assert!(s[1].route.stream.as_ref().unwrap().is_match("prod/a"));
        let SinkKind::Postgres(p) = &s[2].kind else {
            panic!()
        };
        assert_eq!(
            (p.table.as_str(), p.node_id.as_str()),
            ("app.logs", "agg-1")
        );
        let SinkKind::Nats(n) = &s[3].kind else {
            panic!()
        };
        assert_eq!(n.subject, "logs.{stream}");
        assert!(s[3].route.tag.is_some());
        let built = build_sinks(&s).unwrap();
        assert_eq!(built[1].name(), "http");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(
            r#"
[[sink]]
type = "http"
[[sink]]
type = "http"
url = "ftp://x"
urll = 1
match_stream = "("
timeout = "soon"
[[sink]]
type = "kafka"
[[sink]]
type = "postgres"
dsn = "host=x"
table = "a;b"
[[sink]]
type = "nats"
url = "nats://x"
subject = "a.*"
[[sink]]
name = "x"
"#,
        )
        .unwrap_err();
        let k = keys(&e);
        for want in [
            "sink[0].url",
            "sink[1].name",
            "sink[1].url",
            "sink[1].urll",
            "sink[1].match_stream",
            "sink[1].timeout",
            "sink[2].type",
            "sink[3].table",
            "sink[4].subject",
            "sink[5].type",
        ] {
            assert!(k.contains(&want.to_string()), "missing {want} in {e}");
        }
        assert!(parse("sink = 1").is_err());
        assert!(parse("sink = []").is_err());
        let e = parse("[[sink]]\ntype=\"file\"\n[[sink]]\ntype=\"file\"\nname=\"f2\"").unwrap_err();
        assert_eq!(keys(&e), ["sink[1].dir"]);
    }

    fn batch(streams: &[(&str, &[&str])]) -> SinkBatch {
        let mut b = SinkBatch {
            first_seq: 3,
            last_seq: 7,
            ..Default::default()
        };
        for (k, tags) in streams {
            let mut data = Vec::new();
            for (i, t) in tags.iter().enumerate() {
                data.extend_from_slice(
                    serde_json::json!({"n": i, "_tag": t, "_stream": k})
                        .to_string()
                        .as_bytes(),
                );
                data.push(b'\n');
            }
            b.records += tags.len() as u64;
            b.streams.push(SinkStream {
                key: k.to_string(),
                count: tags.len() as u64,
                data,
            });
        }
        b
    }

    #[test]
    fn tags() {
        assert_eq!(
            record_tag(br#"{"a":{"_tag":"no"},"_tag":"web","_id":"x"}"#).unwrap(),
            "web"
        );
        assert_eq!(record_tag(br#"{"_tag":"a\"b\u00e9"}"#).unwrap(), "a\"bé");
        assert!(record_tag(br#"{"tag":"x"}"#).is_none());
    }

    #[test]
    fn routing() {
        let b = batch(&[("prod/a", &["web", "db", "web"]), ("dev/b", &["web"])]);
        assert!(route_batch(&b, &Route::default()).is_none());
        let by_stream = Route {
            stream: Some(Regex::new("^prod/").unwrap()),
            tag: None,
        };
        let r = route_batch(&b, &by_stream).unwrap();
        assert_eq!(
            (r.records, r.streams.len(), r.first_seq, r.last_seq),
            (3, 1, 3, 7)
        );
        let by_tag = Route {
            stream: None,
            tag: Some(Regex::new("^web$").unwrap()),
        };
        let r = route_batch(&b, &by_tag).unwrap();
        assert_eq!(r.records, 3);
        assert_eq!(r.streams[0].count, 2);
        assert!(!String::from_utf8_lossy(&r.streams[0].data).contains("\"db\""));
        let both = Route {
            stream: by_stream.stream.clone(),
            tag: by_tag.tag.clone(),
        };
        assert_eq!(route_batch(&b, &both).unwrap().records, 2);
        let all_web = batch(&[("x", &["web", "web"])]);
        assert!(route_batch(&all_web, &by_tag).is_none());
        let none = Route {
            stream: Some(Regex::new("^nothing$").unwrap()),
            tag: None,
        };
        assert_eq!(route_batch(&b, &none).unwrap().records, 0);
    }

    proptest! {
        #[test]
        fn prop_routing_keeps_exactly_the_matching_records(
            tags in proptest::collection::vec(proptest::collection::vec("[ab]{1,2}", 0..20), 1..5),
        ) {
            let streams: Vec<(String, Vec<&str>)> = tags
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("s{i}"), t.iter().map(String::as_str).collect()))
                .collect();
            let refs: Vec<(&str, &[&str])> = streams.iter().map(|(k, t)| (k.as_str(), t.as_slice())).collect();
            let b = batch(&refs);
            let route = Route { stream: Some(Regex::new("[02]$").unwrap()), tag: Some(Regex::new("^a").unwrap()) };
            let out = route_batch(&b, &route).map_or(b.clone(), |o| o);
            let mut want = 0u64;
            for (i, t) in tags.iter().enumerate() {
                if i == 0 || i == 2 {
                    want += t.iter().filter(|t| t.starts_with('a')).count() as u64;
                }
            }
            prop_assert_eq!(out.records, want);
            for s in &out.streams {
                let lines = s.data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() as u64;
                prop_assert_eq!(lines, s.count);
                for l in s.data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    prop_assert!(record_tag(l).unwrap().starts_with('a'));
                }
            }
        }
    }
}
