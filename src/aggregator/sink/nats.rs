//! NATS JetStream sink: every record becomes one message (the JSON line, without its
//! newline) published to a subject rendered from a template per stream key
//! (`logs.{stream}` → `logs.ns.app` for key `ns/app`, see [`render_subject`]). `write`
//! resolves `Ok` only once the server acknowledged every publish of the batch.
//!
//! Retries cannot duplicate within the stream's duplicate window: each message carries the
//! record's `_id` as `Nats-Msg-Id` (option `dedupe`, default on), which JetStream uses to drop
//! repeats. With `stream` set and `create_stream` on (the default), the stream is created at
//! open if missing, with `stream_subjects` (default: the template with `{stream}` → `>`).
//!
//! This module owns the client connection (async-nats reconnects by itself), the subject
//! rendering and id extraction (sans-IO); it does not buffer beyond one batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{Publish, PublishAckFuture};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use super::{Sink, SinkBatch, SinkError, SinkFuture};

/// Settings of a NATS JetStream sink (see `sink::config` for the keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSinkConfig {
    pub name: String,
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject template; `{stream}` is replaced by the sanitised stream key.
    pub subject: String,
    /// JetStream stream to check or create at open (None: publish only; the subjects must
    /// belong to some stream or every publish fails).
    pub stream: Option<String>,
    pub create_stream: bool,
    /// Subjects of a created stream (default: derived from the template).
    pub stream_subjects: Vec<String>,
    /// Set `Nats-Msg-Id` to the record's `_id`. Default true.
    pub dedupe: bool,
    /// Bound of connecting and of publishing one batch (until every ack). Default 30 s.
    pub timeout: Duration,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

impl NatsSinkConfig {
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> NatsSinkConfig {
        NatsSinkConfig {
            name: name.into(),
            url: url.into(),
            subject: DEFAULT_SUBJECT.into(),
            stream: None,
            create_stream: true,
            stream_subjects: Vec::new(),
            dedupe: true,
            timeout: Duration::from_secs(30),
            user: None,
            password: None,
            token: None,
        }
    }
}

pub const DEFAULT_SUBJECT: &str = "logs.{stream}";
/// Publishes awaiting their ack at once.
const MAX_INFLIGHT: usize = 4096;

/// Render `template` for stream `key`: the key is split at `/` into subject tokens, every
/// byte outside `[A-Za-z0-9_-]` (including `.`, `*`, `>`, whitespace, non-ASCII) becomes `_`,
/// and empty tokens become `_`. So `ns/app.v2` → `ns.app_v2`.
pub fn render_subject(template: &str, key: &str) -> String {
    if !template.contains("{stream}") {
        return template.to_string();
    }
    let mut s = String::with_capacity(key.len() + 4);
    for (i, seg) in key.split('/').enumerate() {
        if i > 0 {
            s.push('.');
        }
        if seg.is_empty() {
            s.push('_');
        }
        for c in seg.chars() {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                s.push(c);
            } else {
                s.push('_');
            }
        }
    }
    template.replace("{stream}", &s)
}

/// Is `s` a subject one can publish to (non-empty tokens, no wildcards or whitespace)?
pub fn valid_publish_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>')
        })
}

/// Check a subject template; returns the stream subjects to create by default.
pub fn check_template(template: &str) -> Result<Vec<String>, String> {
    if template.matches("{stream}").count() > 1 {
        return Err("use {stream} at most once".into());
    }
    let sample = render_subject(template, "a/b");
    if !valid_publish_subject(&sample) || template.contains('{') && !template.contains("{stream}") {
        return Err(format!(
            "{template:?} does not give a valid NATS subject (dot-separated non-empty tokens without spaces, '*' or '>'; the only placeholder is {{stream}})"
        ));
    }
    match template.strip_suffix("{stream}") {
        None if !template.contains("{stream}") => Ok(vec![template.to_string()]),
        Some(prefix) if prefix.ends_with('.') => Ok(vec![format!("{prefix}>")]),
        _ => Err(format!(
            "cannot derive the stream's subjects from {template:?}: put {{stream}} last after a '.' (e.g. \"logs.{{stream}}\") or set stream_subjects"
        )),
    }
}

/// The record's `_id` value (the last top-level `"_id":"…"` of the line, as raw JSON string
/// content), if any.
pub fn record_id(line: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"_id\":\"";
    let at = memchr::memmem::rfind(line, KEY)? + KEY.len();
    let rest = &line[at..];
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' => i += 2,
            b'"' => {
                let id = std::str::from_utf8(&rest[..i]).ok()?;
                return (!id.is_empty() && id.len() <= 256).then_some(id);
            }
            _ => i += 1,
        }
    }
    None
}

/// See the module docs.
pub struct NatsSink {
    cfg: NatsSinkConfig,
    js: Option<jetstream::Context>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("name", &self.cfg.name)
            .field("url", &self.cfg.url)
            .finish()
    }
}

fn other(msg: String) -> SinkError {
    SinkError::Other(msg)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl NatsSink {
    /// Check the settings (no connection is made yet).
    pub fn new(cfg: NatsSinkConfig) -> Result<NatsSink, SinkError> {
        let derived = check_template(&cfg.subject).map_err(|e| other(format!("subject {e}")))?;
        let mut cfg = cfg;
        if cfg.stream_subjects.is_empty() {
            cfg.stream_subjects = derived;
        }
        Ok(NatsSink { cfg, js: None })
    }

    async fn open_inner(&mut self) -> Result<(), SinkError> {
        let c = &self.cfg;
        let mut opts = match (&c.user, &c.password, &c.token) {
            (Some(u), Some(p), _) => {
                async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone())
            }
            (_, _, Some(t)) => async_nats::ConnectOptions::with_token(t.clone()),
            _ => async_nats::ConnectOptions::new(),
        };
        opts = opts
            .name(format!("logmesh-{}", c.name))
            .connection_timeout(c.timeout)
            .request_timeout(Some(c.timeout))
            .max_reconnects(None);
        let client = opts.connect(c.url.as_str()).await.map_err(|e| {
            other(format!(
                "cannot connect to NATS at {}: {}; is nats-server running there?",
                c.url,
                chain(&e)
            ))
        })?;
        let mut js = jetstream::new(client);
        js.set_timeout(c.timeout);
        if let Some(name) = &c.stream {
            if c.create_stream {
                js.get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: c.stream_subjects.clone(),
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    other(format!(
                        "cannot create JetStream stream {name:?} with subjects {:?} at {}: {}; is JetStream enabled (nats-server -js)?",
                        c.stream_subjects,
                        c.url,
                        chain(&e)
                    ))
                })?;
            } else {
                js.get_stream(name).await.map_err(|e| {
                    other(format!(
                        "JetStream stream {name:?} is not usable at {}: {}; create it or set create_stream = true",
                        c.url,
                        chain(&e)
                    ))
                })?;
            }
        }
        self.js = Some(js);
        Ok(())
    }

    async fn write_inner(
        &self,
        js: &jetstream::Context,
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        let mut inflight: VecDeque<(PublishAckFuture, usize)> = VecDeque::new();
        for (si, s) in batch.streams.iter().enumerate() {
            let subject = async_nats::Subject::from(render_subject(&self.cfg.subject, &s.key));
            let data = Bytes::copy_from_slice(&s.data);
            let mut start = 0;
            while start < data.len() {
                let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
                let line = &data[start..end];
                if !line.iter().all(u8::is_ascii_whitespace) {
                    let mut p = Publish::build().payload(data.slice(start..end));
                    if self.cfg.dedupe {
                        if let Some(id) = record_id(line) {
                            p = p.message_id(id);
                        }
                    }
                    let ack = js.send_publish(subject.clone(), p).await.map_err(|e| {
                        other(format!(
                            "publishing to {subject} at {} failed: {}",
                            self.cfg.url,
                            chain(&e)
                        ))
                    })?;
                    inflight.push_back((ack, si));
                    if inflight.len() >= MAX_INFLIGHT {
                        if let Some((ack, si)) = inflight.pop_front() {
                            self.await_ack(ack, batch, si).await?;
                        }
                    }
                }
                start = end + 1;
            }
        }
        while let Some((ack, si)) = inflight.pop_front() {
            self.await_ack(ack, batch, si).await?;
        }
        Ok(())
    }

    async fn await_ack(
        &self,
        ack: PublishAckFuture,
        batch: &SinkBatch,
        si: usize,
    ) -> Result<(), SinkError> {
        ack.await.map(|_| ()).map_err(|e| {
            let key = batch.streams.get(si).map_or("", |s| s.key.as_str());
            other(format!(
                "JetStream did not acknowledge a record of stream {key:?} (subject {}) at {}: {}; does a stream cover that subject?",
                render_subject(&self.cfg.subject, key),
                self.cfg.url,
                chain(&e)
            ))
        })
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn open(&mut self) -> SinkFuture<'_, Option<u64>> {
        Box::pin(async move {
            let t = self.cfg.timeout;
            match tokio::time::timeout(t, self.open_inner()).await {
                Ok(r) => r.map(|()| None),
                Err(_) => Err(other(format!(
                    "opening NATS at {} timed out after {t:?}",
                    self.cfg.url
                ))),
            }
        })
    }

    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            if self.js.is_none() {
                self.open_inner().await?;
            }
            let js = self
                .js
                .clone()
                .ok_or_else(|| other("NATS sink is not connected".into()))?;
            let t = self.cfg.timeout;
            match tokio::time::timeout(t, self.write_inner(&js, &batch)).await {
                Ok(r) => r,
                Err(_) => Err(other(format!(
                    "publishing {} records to NATS at {} was not acknowledged within {t:?}; is the server up?",
                    batch.records, self.cfg.url
                ))),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subjects() {
        assert_eq!(render_subject("logs.{stream}", "ns/app"), "logs.ns.app");
        assert_eq!(
            render_subject("logs.{stream}", "a.b c*>/"),
            "logs.a_b_c__._"
        );
        assert_eq!(render_subject("logs.{stream}", ""), "logs._");
        assert_eq!(render_subject("x.{stream}.y", "é"), "x._.y");
        assert_eq!(render_subject("fixed", "k"), "fixed");
        assert_eq!(check_template("logs.{stream}").unwrap(), vec!["logs.>"]);
        assert_eq!(check_template("all").unwrap(), vec!["all"]);
        assert!(check_template("x.{stream}.y").is_err());
        assert!(check_template("logs.{stream}.{stream}").is_err());
        assert!(check_template("logs.*").is_err());
        assert!(check_template("logs..x").is_err());
        assert!(check_template("logs.{tag}").is_err());
    }

    proptest! {
        #[test]
        fn prop_rendered_subjects_are_valid(key in "\\PC{0,40}") {
            let subject = render_subject("logs.{stream}", &key);
            prop_assert!(valid_publish_subject(&subject), "{}", subject);
        }
    }

    #[test]
    fn ids() {
        assert_eq!(
            record_id(br#"{"a":{"_id":"inner"},"_ts":"t","_id":"c1-42","x":"y"}"#),
            Some("c1-42")
        );
        assert_eq!(record_id(br#"{"_id":"a\"b"}"#), Some("a\\\"b"));
        assert_eq!(record_id(br#"{"m":"no id"}"#), None);
        assert_eq!(record_id(br#"{"_id":"unterminated"#), None);
    }
}
