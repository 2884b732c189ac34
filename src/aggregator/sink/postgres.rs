//! PostgreSQL sink: each batch is one transaction holding a `COPY <table> (stream, record)
//! FROM STDIN` of all its records (a `jsonb` column) and the sink's new position; `write`
//! resolves `Ok` only after `COMMIT`.
//!
//! Exactly-once: the position (first WAL sequence not yet held) is kept per (node, sink) in
//! `logmesh_sink_positions`, next to the table and committed in the same transaction; `open`
//! reports it, so after a crash delivery resumes right after the last committed batch. A retry
//! of a batch whose commit may have succeeded (the answer was lost) checks the position first.
//!
//! Tables are created if missing (`create_table`, default on):
//! `<table> (id bigserial primary key, stream text not null, record jsonb not null,
//! inserted_at timestamptz not null default now())`; the positions table is always created
//! if missing (in the table's schema).
//!
//! This module owns the connection (reconnecting on the next write after any error), the
//! COPY text encoding ([`encode_copy_rows`], sans-IO) and the SQL. Connections are plain TCP
//! or Unix socket (no TLS).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::{Client, NoTls};

use super::{Sink, SinkBatch, SinkError, SinkFuture};

/// Settings of a PostgreSQL sink (see `sink::config` for the keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSinkConfig {
    pub name: String,
    /// libpq-style connection string or `postgresql://` URL.
    pub dsn: String,
    /// Target table, `name` or `schema.name` (letters, digits, `_`; quoted as given).
    pub table: String,
    /// Create the tables if missing. Default true.
    pub create_table: bool,
    /// Bound of connecting and of one batch's transaction. Default 30 s.
    pub timeout: Duration,
    /// This aggregator's node id: positions are kept per (node, sink).
    pub node_id: String,
}

impl PostgresSinkConfig {
    pub fn new(
        name: impl Into<String>,
        dsn: impl Into<String>,
        node_id: impl Into<String>,
    ) -> PostgresSinkConfig {
        PostgresSinkConfig {
            name: name.into(),
            dsn: dsn.into(),
            table: DEFAULT_TABLE.into(),
            create_table: true,
            timeout: Duration::from_secs(30),
            node_id: node_id.into(),
        }
    }
}

pub const DEFAULT_TABLE: &str = "logmesh_logs";
const POSITIONS: &str = "logmesh_sink_positions";
/// COPY data is sent in messages of about this size.
const COPY_CHUNK: usize = 1 << 20;

/// Check a table name: `name` or `schema.name`, each part `[A-Za-z_][A-Za-z0-9_]*`, at most
/// 63 bytes. Returns the quoted form and the quoted positions table in the same schema.
pub fn quote_table(table: &str) -> Result<(String, String), String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.is_empty() || parts.len() > 2 {
        return Err(format!("{table:?} must be NAME or SCHEMA.NAME"));
    }
    for p in &parts {
        let ok = !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(format!(
                "{table:?}: each part must be 1-63 characters of [A-Za-z0-9_], not starting with a digit"
            ));
        }
    }
    let quoted: Vec<String> = parts.iter().map(|p| format!("\"{p}\"")).collect();
    let positions = if parts.len() == 2 {
        format!("{}.\"{POSITIONS}\"", quoted[0])
    } else {
        format!("\"{POSITIONS}\"")
    };
    Ok((quoted.join("."), positions))
}

/// Append `bytes` escaped for COPY's text format (`\` `\t` `\r` `\n` escaped).
fn escape_text(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for i in memchr::memchr3_iter(b'\\', b'\t', b'\r', bytes) {
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(match bytes[i] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            _ => b"\\r",
        });
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    // '\n' only matters for keys (records are single lines)
}

/// Append one record (a JSON line without its newline) for COPY's text format. `\u0000`
/// escapes, which `jsonb` refuses, become `\ufffd`.
fn escape_record(out: &mut Vec<u8>, rec: &[u8]) {
    if memchr::memmem::find(rec, b"\\u0000").is_none() {
        escape_text(out, rec);
        return;
    }
    let mut i = 0;
    let mut start = 0;
    while i < rec.len() {
        if rec[i] == b'\\' {
            if rec[i..].starts_with(b"\\u0000") {
                escape_text(out, &rec[start..i]);
                out.extend_from_slice(b"\\\\ufffd");
                i += 6;
                start = i;
                continue;
            }
            i += 2; // skip the escaped character, whatever it is
            continue;
        }
        i += 1;
    }
    escape_text(out, &rec[start.min(rec.len())..]);
}

/// Encode the NDJSON `data` of stream `key` as COPY text rows `key \t record \n` appended to
/// `out`; returns the number of rows. Empty lines are skipped.
pub fn encode_copy_rows(key: &str, data: &[u8], out: &mut Vec<u8>) -> u64 {
    let mut ekey = Vec::with_capacity(key.len() + 2);
    escape_text(&mut ekey, key.as_bytes());
    let ekey = replace_newlines(ekey);
    let mut rows = 0;
    let mut start = 0;
    while start < data.len() {
        let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
        let mut line = &data[start..end];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            out.extend_from_slice(&ekey);
            out.push(b'\t');
            escape_record(out, line);
            out.push(b'\n');
            rows += 1;
        }
        start = end + 1;
    }
    rows
}

fn replace_newlines(v: Vec<u8>) -> Vec<u8> {
    if !v.contains(&b'\n') {
        return v;
    }
    let mut out = Vec::with_capacity(v.len() + 4);
    for b in v {
        if b == b'\n' {
            out.extend_from_slice(b"\\n");
        } else {
            out.push(b);
        }
    }
    out
}

fn pg_error(what: &str, e: &tokio_postgres::Error) -> SinkError {
    let msg = match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        None => {
            let mut m = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                m.push_str(&format!(": {c}"));
                cur = c.source();
            }
            m
        }
    };
    // data exceptions (22xxx: invalid JSON, bad encoding, ...) and integrity violations
    // (23xxx) are about the records: retrying the same batch cannot succeed
    let permanent = e
        .as_db_error()
        .is_some_and(|db| matches!(db.code().code().get(..2), Some("22" | "23")));
    if permanent {
        SinkError::Rejected(format!("postgres {what}: {msg}"))
    } else {
        SinkError::Other(format!("postgres {what}: {msg}"))
    }
}

struct Conn {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// See the module docs.
pub struct PostgresSink {
    cfg: PostgresSinkConfig,
    pg: tokio_postgres::Config,
    table: String,
    positions: String,
    conn: Option<Conn>,
    /// The batch of the last failed write: its commit may have succeeded.
    uncertain: Option<(u64, u64)>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("name", &self.cfg.name)
            .field("table", &self.table)
            .finish()
    }
}

impl PostgresSink {
    /// Check the settings (no connection is made yet).
    pub fn new(cfg: PostgresSinkConfig) -> Result<PostgresSink, SinkError> {
        let mut pg: tokio_postgres::Config = cfg.dsn.parse().map_err(|e| {
            SinkError::Other(format!(
                "dsn is not a valid PostgreSQL connection string: {e}"
            ))
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(cfg.timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("logmesh");
        }
        let (table, positions) = quote_table(&cfg.table).map_err(SinkError::Other)?;
        Ok(PostgresSink {
            cfg,
            pg,
            table,
            positions,
            conn: None,
            uncertain: None,
            buf: Vec::new(),
        })
    }

    async fn connect(&mut self) -> Result<&mut Client, SinkError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let (client, connection) = self
                .pg
                .connect(NoTls)
                .await
                .map_err(|e| pg_error(&format!("connect to {}", self.target()), &e))?;
            let name = self.cfg.name.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(sink = %name, error = %e, "postgres connection ended");
                }
            });
            self.conn = Some(Conn { client, task });
        }
        match self.conn.as_mut() {
            Some(c) => Ok(&mut c.client),
            None => Err(SinkError::Other("postgres connection vanished".into())),
        }
    }

    /// `host:port` of the server(s), for messages (never the password).
    fn target(&self) -> String {
        let ports = self.pg.get_ports();
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match h {
                    tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                    tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
                }
            })
            .collect();
        if hosts.is_empty() {
            "the default server".into()
        } else {
            hosts.join(",")
        }
    }

    async fn open_inner(&mut self) -> Result<Option<u64>, SinkError> {
        let create = self.cfg.create_table;
        let (table, positions) = (self.table.clone(), self.positions.clone());
        let (node, sink) = (self.cfg.node_id.clone(), self.cfg.name.clone());
        let client = self.connect().await?;
        if create {
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (
                        id bigserial PRIMARY KEY,
                        stream text NOT NULL,
                        record jsonb NOT NULL,
                        inserted_at timestamptz NOT NULL DEFAULT now())"
                ))
                .await
                .map_err(|e| pg_error(&format!("creating table {table}"), &e))?;
        }
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {positions} (
                    node text NOT NULL,
                    sink text NOT NULL,
                    next_seq bigint NOT NULL,
                    PRIMARY KEY (node, sink))"
            ))
            .await
            .map_err(|e| pg_error(&format!("creating table {positions}"), &e))?;
        let row = client
            .query_opt(
                &format!("SELECT next_seq FROM {positions} WHERE node = $1 AND sink = $2"),
                &[&node, &sink],
            )
            .await
            .map_err(|e| pg_error("reading the sink position", &e))?;
        Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
    }

    async fn write_inner(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        let mut buf = std::mem::take(&mut self.buf);
        let (table, positions) = (self.table.clone(), self.positions.clone());
        let (node, sink) = (self.cfg.node_id.clone(), self.cfg.name.clone());
        // a piece of a split batch records no position: it cannot be recognised as a replay
        let check = !batch.partial && self.uncertain == Some((batch.first_seq, batch.last_seq));
        self.uncertain = (!batch.partial).then_some((batch.first_seq, batch.last_seq));
        let next = (batch.last_seq + 1) as i64;
        let client = self.connect().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_error("BEGIN", &e))?;
        if check {
            let row = tx
                .query_opt(
                    &format!(
                        "SELECT next_seq FROM {positions} WHERE node = $1 AND sink = $2 FOR UPDATE"
                    ),
                    &[&node, &sink],
                )
                .await
                .map_err(|e| pg_error("reading the sink position", &e))?;
            if row.is_some_and(|r| r.get::<_, i64>(0) == next) {
                tracing::info!(sink = %sink, first = batch.first_seq, last = batch.last_seq,
                    "postgres: the retried batch was already committed");
                tx.rollback().await.map_err(|e| pg_error("ROLLBACK", &e))?;
                self.buf = buf;
                return Ok(());
            }
        }
        {
            let copy = tx
                .copy_in::<_, Bytes>(&format!("COPY {table} (stream, record) FROM STDIN"))
                .await
                .map_err(|e| pg_error(&format!("COPY into {table}"), &e))?;
            let mut copy = pin!(copy);
            buf.clear();
            for s in &batch.streams {
                // Encode in pieces so one message stays near COPY_CHUNK.
                for (range, _) in super::http::split_lines(&s.data, COPY_CHUNK) {
                    encode_copy_rows(&s.key, &s.data[range], &mut buf);
                    if buf.len() >= COPY_CHUNK {
                        let chunk = Bytes::copy_from_slice(&buf);
                        buf.clear();
                        copy.send(chunk).await.map_err(|e| {
                            pg_error(
                                &format!("COPY into {table} (is every record valid JSON?)"),
                                &e,
                            )
                        })?;
                    }
                }
            }
            if !buf.is_empty() {
                let chunk = Bytes::copy_from_slice(&buf);
                buf.clear();
                copy.send(chunk).await.map_err(|e| {
                    pg_error(
                        &format!("COPY into {table} (is every record valid JSON?)"),
                        &e,
                    )
                })?;
            }
            copy.as_mut().finish().await.map_err(|e| {
                pg_error(
                    &format!("COPY into {table} (is every record valid JSON?)"),
                    &e,
                )
            })?;
        }
        if !batch.partial {
            tx.execute(
                &format!(
                    "INSERT INTO {positions} (node, sink, next_seq) VALUES ($1, $2, $3)
                 ON CONFLICT (node, sink) DO UPDATE SET next_seq = EXCLUDED.next_seq"
                ),
                &[&node, &sink, &next],
            )
            .await
            .map_err(|e| pg_error("saving the sink position", &e))?;
        }
        tx.commit().await.map_err(|e| pg_error("COMMIT", &e))?;
        if buf.capacity() <= 4 * COPY_CHUNK {
            self.buf = buf;
        }
        self.uncertain = None;
        Ok(())
    }

    fn timed_out(&mut self, what: &str) -> SinkError {
        self.conn = None;
        SinkError::Other(format!(
            "postgres {what} timed out after {:?}; is the server up? (raise the sink's timeout for very large batches)",
            self.cfg.timeout
        ))
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn open(&mut self) -> SinkFuture<'_, Option<u64>> {
        Box::pin(async move {
            let t = self.cfg.timeout;
            match tokio::time::timeout(t, self.open_inner()).await {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(e)) => {
                    self.conn = None;
                    Err(e)
                }
                Err(_) => Err(self.timed_out("open")),
            }
        })
    }

    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let t = self.cfg.timeout;
            match tokio::time::timeout(t, self.write_inner(&batch)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    // The connection's state is unknown: start afresh next time.
                    self.conn = None;
                    if matches!(e, SinkError::Rejected(_)) {
                        // the server refused the data: the transaction surely did not commit
                        self.uncertain = None;
                    }
                    Err(e)
                }
                Err(_) => Err(self.timed_out("write")),
            }
        })
    }

    fn close(&mut self) -> SinkFuture<'_, ()> {
        self.conn = None;
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rows(key: &str, data: &str) -> String {
        let mut out = Vec::new();
        encode_copy_rows(key, data.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn copy_encoding() {
        assert_eq!(
            rows("a/b", "{\"x\":1}\n{\"y\":2}\n"),
            "a/b\t{\"x\":1}\na/b\t{\"y\":2}\n"
        );
        assert_eq!(
            rows("k", "{\"m\":\"a\\\"b\\\\c\"}\n"),
            "k\t{\"m\":\"a\\\\\"b\\\\\\\\c\"}\n"
        );
        assert_eq!(
            rows("t\tk\n", "{\"a\":\t1}\r\n\n  \n"),
            "t\\tk\\n\t{\"a\":\\t1}\n"
        );
        // \u0000 (refused by jsonb) becomes \ufffd; an escaped backslash before u0000 does not
        assert_eq!(
            rows("k", "{\"a\":\"x\\u0000y\"}\n"),
            "k\t{\"a\":\"x\\\\ufffdy\"}\n"
        );
        assert_eq!(
            rows("k", "{\"a\":\"\\\\u0000\"}\n"),
            "k\t{\"a\":\"\\\\\\\\u0000\"}\n"
        );
        assert_eq!(rows("k", "{\"a\":1}"), "k\t{\"a\":1}\n");
    }

    /// Undo COPY text escaping of one field.
    fn unescape(f: &str) -> String {
        let mut out = String::new();
        let mut it = f.chars();
        while let Some(c) = it.next() {
            if c == '\\' {
                match it.next() {
                    Some('t') => out.push('\t'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some(o) => out.push(o),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn prop_copy_rows_round_trip(key in "\\PC{0,20}", vals in proptest::collection::vec("\\PC{0,40}", 1..10)) {
            let mut data = Vec::new();
            for v in &vals {
                data.extend_from_slice(serde_json::json!({"v": v}).to_string().as_bytes());
                data.push(b'\n');
            }
            let mut out = Vec::new();
            let n = encode_copy_rows(&key, &data, &mut out);
            prop_assert_eq!(n, vals.len() as u64);
            let text = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = text.split_terminator('\n').collect();
            prop_assert_eq!(lines.len(), vals.len());
            for (line, v) in lines.iter().zip(&vals) {
                let (k, r) = line.split_once('\t').unwrap();
                prop_assert_eq!(unescape(k), key.clone());
                let back: serde_json::Value = serde_json::from_str(&unescape(r)).unwrap();
                prop_assert_eq!(back["v"].as_str().unwrap(), v.replace('\0', "\u{fffd}"));
            }
        }
    }

    #[test]
    fn table_names() {
        assert_eq!(
            quote_table("logs").unwrap(),
            ("\"logs\"".into(), "\"logmesh_sink_positions\"".into())
        );
        assert_eq!(quote_table("app.Logs_2").unwrap().0, "\"app\".\"Logs_2\"");
        assert!(quote_table("a;drop").is_err());
        assert!(quote_table("a.b.c").is_err());
        assert!(quote_table("1a").is_err());
        assert!(quote_table("").is_err());
    }

    #[test]
    fn bad_dsn_is_named() {
        let e = PostgresSink::new(PostgresSinkConfig::new("p", "host=x port=notanumber", "n"))
            .unwrap_err();
        assert!(e.to_string().contains("dsn"), "{e}");
    }
}
