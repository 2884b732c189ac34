//! HTTP sink: POSTs NDJSON to a URL, one request per stream of a batch (split further so no
//! request body exceeds `max_request_bytes`).
//!
//! Each request carries `Content-Type: application/x-ndjson`, `X-Logmesh-Stream` (the stream
//! key, percent-encoded outside `[A-Za-z0-9._~/:@-]`), `X-Logmesh-Records` (lines in the
//! body) and `X-Logmesh-Batch` (`<first_seq>-<last_seq>.<part>`, the same on a retry, so a
//! receiver can drop repeats), plus the configured headers; optionally gzip
//! (`Content-Encoding: gzip`). A status other than 2xx, a connection error or a timeout fails
//! the whole batch and the store retries it with backoff: the receiver may see a part twice.
//!
//! This module owns the request building (sans-IO helpers [`split_lines`],
//! [`header_value_for_key`]) and the hyper client; it does not retry or buffer.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{Sink, SinkBatch, SinkError, SinkFuture};

/// Settings of an HTTP sink (see `sink::config` for the keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSinkConfig {
    pub name: String,
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// Bound of one request (connect, send, response). Default 30 s.
    pub timeout: Duration,
    /// gzip request bodies.
    pub gzip: bool,
    /// PEM CA bundle for https (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// Bodies are split at line boundaries to stay under this size. Default 4 MiB.
    pub max_request_bytes: usize,
    /// Requests in flight at once per batch. Default 4.
    pub concurrency: usize,
}

impl HttpSinkConfig {
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> HttpSinkConfig {
        HttpSinkConfig {
            name: name.into(),
            url: url.into(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            gzip: false,
            ca: None,
            max_request_bytes: 4 << 20,
            concurrency: 4,
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// See the module docs.
pub struct HttpSink {
    cfg: HttpSinkConfig,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: HttpClient,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink").field("cfg", &self.cfg).finish()
    }
}

fn other(msg: String) -> SinkError {
    SinkError::Other(msg)
}

/// Does this HTTP status refuse the records themselves (so retrying them cannot help)? Client
/// errors do, except those about credentials, the URL or load: 401, 403, 404, 408, 429.
pub fn rejects_records(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 404 | 408 | 429)
}

impl HttpSink {
    /// Check the settings and build the client (no connection is made yet).
    pub fn new(cfg: HttpSinkConfig) -> Result<HttpSink, SinkError> {
        let uri: Uri = cfg.url.parse().map_err(|e| {
            other(format!(
                "url {:?} is not a valid URL: {e}",
                crate::config::redact_userinfo(&cfg.url)
            ))
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(other(format!(
                    "url {:?} must start with http:// or https://",
                    cfg.url
                )))
            }
        };
        if uri.host().is_none() {
            return Err(other(format!("url {:?} has no host", cfg.url)));
        }
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| other(format!("header name {k:?} is invalid: {e}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| other(format!("value of header {k:?} is invalid: {e}")))?;
            headers.push((name, value));
        }
        let tls = tls_config(https, cfg.ca.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpSink {
            cfg,
            uri,
            headers,
            client,
        })
    }

    fn request(&self, part: &Part) -> Result<Request<Full<Bytes>>, SinkError> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/x-ndjson")
            .header("x-logmesh-stream", part.key.clone())
            .header("x-logmesh-records", part.records)
            .header("x-logmesh-batch", part.batch_id.as_str());
        if self.cfg.gzip {
            b = b.header(CONTENT_ENCODING, "gzip");
        }
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(Full::new(part.body.clone()))
            .map_err(|e| other(format!("cannot build the request: {e}")))
    }

    async fn send(&self, part: Part) -> Result<(), SinkError> {
        let req = self.request(&part)?;
        // errors reach logs and /status: never with the URL's credentials
        let url = &crate::config::redact_userinfo(&self.cfg.url);
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                other(format!(
                    "POST {url} failed: {}; is the server up and reachable?",
                    error_chain(&e)
                ))
            })?;
            let status = resp.status();
            // Read (a bounded part of) the body either way, so the connection can be reused.
            let body = read_limited(resp.into_body(), 64 << 10).await;
            if status.is_success() {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            let text: String = text.chars().take(300).collect();
            let msg = format!(
                "POST {url} answered {status} (stream {:?}, {} records); response: {text:?}",
                part.stream, part.records
            );
            if rejects_records(status.as_u16()) {
                Err(SinkError::Rejected(msg))
            } else {
                Err(other(msg))
            }
        };
        tokio::time::timeout(self.cfg.timeout, fut)
            .await
            .map_err(|_| {
                other(format!(
                    "POST {url} timed out after {:?} (stream {:?}); raise the sink's timeout or check the server",
                    self.cfg.timeout, part.stream
                ))
            })?
    }
}

async fn read_limited(mut body: hyper::body::Incoming, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            if out.len() < limit {
                out.extend_from_slice(&data[..data.len().min(limit - out.len())]);
            }
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
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

fn tls_config(
    https: bool,
    ca: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, SinkError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca {
        let pem = std::fs::read(path)
            .map_err(|e| other(format!("cannot read ca file {}: {e}", path.display())))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert =
                cert.map_err(|e| other(format!("ca file {} is not PEM: {e}", path.display())))?;
            roots.add(cert).map_err(|e| {
                other(format!(
                    "ca file {} holds a bad certificate: {e}",
                    path.display()
                ))
            })?;
        }
        if roots.is_empty() {
            return Err(other(format!(
                "ca file {} holds no certificate",
                path.display()
            )));
        }
    } else if https {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(other(
                "no system CA certificates found for https; install ca-certificates or set the sink's ca".into(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| other(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One request body.
struct Part {
    stream: String,
    key: HeaderValue,
    records: u64,
    batch_id: String,
    body: Bytes,
}

/// Split NDJSON `data` into consecutive pieces of whole lines, each at most `max` bytes
/// unless a single line is longer (then that line is a piece of its own). Returns
/// `(range, lines)` per piece; an empty input gives no piece.
pub fn split_lines(data: &[u8], max: usize) -> Vec<(std::ops::Range<usize>, u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    let mut lines = 0u64;
    while pos < data.len() {
        let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
        if end - start > max && lines > 0 {
            out.push((start..pos, lines));
            start = pos;
            lines = 0;
        }
        lines += 1;
        pos = end;
    }
    if pos > start {
        out.push((start..pos, lines));
    }
    out
}

/// Header value for a stream key: bytes outside `[A-Za-z0-9._~/:@-]` become `%XX`.
pub fn header_value_for_key(key: &str) -> HeaderValue {
    let mut s = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"._~/:@-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("%invalid"))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>, SinkError> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// The request bodies of a batch: per stream, split at `max` bytes, optionally gzipped.
fn make_parts(batch: &SinkBatch, max: usize, gzip_on: bool) -> Result<Vec<Part>, SinkError> {
    let mut parts = Vec::new();
    for s in &batch.streams {
        let key = header_value_for_key(&s.key);
        for (range, lines) in split_lines(&s.data, max) {
            let raw = &s.data[range];
            let body = if gzip_on {
                Bytes::from(gzip(raw)?)
            } else {
                Bytes::copy_from_slice(raw)
            };
            parts.push(Part {
                stream: s.key.clone(),
                key: key.clone(),
                records: lines,
                batch_id: format!("{}-{}.{}", batch.first_seq, batch.last_seq, parts.len()),
                body,
            });
        }
    }
    Ok(parts)
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let (max, gz) = (self.cfg.max_request_bytes, self.cfg.gzip);
            let parts = if gz {
                // Compression is CPU work: keep it off the async workers.
                let b = batch.clone();
                tokio::task::spawn_blocking(move || make_parts(&b, max, true))
                    .await
                    .map_err(|e| other(format!("gzip task failed: {e}")))??
            } else {
                make_parts(&batch, max, false)?
            };
            let this = &*self;
            futures_util::stream::iter(parts)
                .map(|p| this.send(p))
                .buffer_unordered(self.cfg.concurrency.max(1))
                .try_collect::<()>()
                .await
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_examples() {
        assert!(split_lines(b"", 10).is_empty());
        assert_eq!(split_lines(b"a\nb\n", 10), vec![(0..4, 2)]);
        assert_eq!(
            split_lines(b"aaaa\nbbbb\ncc\n", 6),
            vec![(0..5, 1), (5..10, 1), (10..13, 1)]
        );
        assert_eq!(split_lines(b"aa\nbb\ncc\n", 6), vec![(0..6, 2), (6..9, 1)]);
        // a line longer than the limit is a piece of its own
        assert_eq!(
            split_lines(b"a\nxxxxxxxx\nb\n", 4),
            vec![(0..2, 1), (2..11, 1), (11..13, 1)]
        );
        // missing final newline
        assert_eq!(split_lines(b"a\nb", 100), vec![(0..3, 2)]);
    }

    proptest! {
        #[test]
        fn prop_split_covers_everything(lines in proptest::collection::vec("[a-z]{0,30}", 0..50), max in 1usize..100) {
            let data: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
            let parts = split_lines(&data, max);
            let mut pos = 0;
            let mut total = 0;
            for (r, n) in &parts {
                prop_assert_eq!(r.start, pos);
                let piece = &data[r.clone()];
                prop_assert!(piece.ends_with(b"\n"));
                prop_assert_eq!(piece.iter().filter(|b| **b == b'\n').count() as u64, *n);
                prop_assert!(piece.len() <= max || *n == 1);
                pos = r.end;
                total += n;
            }
            prop_assert_eq!(pos, data.len());
            prop_assert_eq!(total, lines.len() as u64);
        }
    }

    #[test]
    fn key_header() {
        assert_eq!(header_value_for_key("ns/app-1"), "ns/app-1");
        assert_eq!(header_value_for_key("a b\n€"), "a%20b%0A%E2%82%AC");
    }

    #[test]
    fn config_errors_are_clear() {
        let e = HttpSink::new(HttpSinkConfig::new("h", "ftp://x")).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let mut c = HttpSinkConfig::new("h", "http://127.0.0.1:1/");
        c.headers.insert("bad header".into(), "x".into());
        let e = HttpSink::new(c).unwrap_err();
        assert!(e.to_string().contains("bad header"), "{e}");
    }

    #[tokio::test]
    async fn refused_connection_names_the_url() {
        // a port nothing listens on
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let mut s = HttpSink::new(HttpSinkConfig::new(
            "h",
            format!("http://127.0.0.1:{port}/in"),
        ))
        .unwrap();
        let b = SinkBatch {
            first_seq: 1,
            last_seq: 1,
            records: 1,
            streams: vec![super::super::SinkStream {
                key: "k".into(),
                count: 1,
                data: b"{}\n".to_vec(),
            }],
            partial: false,
        };
        let e = s.write(Arc::new(b)).await.unwrap_err().to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    #[test]
    fn permanent_statuses() {
        for st in [400, 409, 413, 415, 422] {
            assert!(rejects_records(st), "{st}");
        }
        for st in [200, 301, 401, 403, 404, 408, 429, 500, 502, 503] {
            assert!(!rejects_records(st), "{st}");
        }
    }
}
