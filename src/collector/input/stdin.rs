//! The stdin input: reads big chunks, splits lines, sends one `InputBatch` per read.
//!
//! Owns: the read loop over any `AsyncRead` ([`run_reader`]; [`run_stdin`] is it on tokio's
//! stdin). Must not: keep state across runs (stdin has no checkpoint) or do per-line work
//! beyond `RecordBuilder::push_line`.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lines::LineSplitter;
use super::{InputError, READ_CHUNK};
use crate::collector::record::{unix_nanos_now, Accumulator, InputBatch, RecordBuilder};

/// Read stdin until EOF (or `cancel`); returns the number of records sent.
pub async fn run_stdin(
    builder: RecordBuilder,
    tag: String,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) -> Result<u64, InputError> {
    run_reader(tokio::io::stdin(), builder, tag, tx, cancel).await
}

/// [`run_stdin`] over any reader. A last line without `\n` is sent at EOF.
pub async fn run_reader<R: AsyncRead + Unpin>(
    mut reader: R,
    mut builder: RecordBuilder,
    tag: String,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) -> Result<u64, InputError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut split = LineSplitter::new(builder.spec().max_record_bytes);
    let mut acc = Accumulator::new();
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = reader.read(&mut buf) => r.map_err(InputError::io("stdin"))?,
        };
        let now = unix_nanos_now();
        if n == 0 {
            split.finish(|line| {
                builder.push_line(&tag, line, now, &mut acc);
            });
        } else {
            split.feed(&buf[..n], |line| {
                builder.push_line(&tag, line, now, &mut acc);
            });
        }
        if !acc.is_empty() {
            let batch = acc.take_batch(None);
            total += batch.records;
            tokio::select! {
                biased;
                r = tx.send(batch) => r.map_err(|_| InputError::PipelineClosed)?,
                _ = cancel.cancelled() => break,
            }
        }
        if n == 0 {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::collector::record::{RecordSpec, SeqAllocator};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn reads_to_eof_including_unterminated_line() {
        let dir = tempfile::tempdir().unwrap();
        let seq = SeqAllocator::open(dir.path()).unwrap();
        let mut spec = RecordSpec::new("c1");
        spec.stream_key = "{svc}".parse().unwrap();
        let b = RecordBuilder::new(Arc::new(spec), seq).unwrap();
        let mut input = Vec::new();
        for i in 0..50_000 {
            input.extend_from_slice(format!("{{\"svc\":\"s{}\",\"i\":{i}}}\n", i % 3).as_bytes());
        }
        input.extend_from_slice(b"\n   \nlast line");
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run_reader(
            std::io::Cursor::new(input),
            b,
            "stdin".into(),
            tx,
            CancellationToken::new(),
        ));
        let mut lines = Vec::new();
        let mut batches = 0;
        while let Some(batch) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
        {
            batches += 1;
            let mut n = 0;
            for c in &batch.chunks {
                n += c.count as u64;
                for l in c.data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                    assert_eq!(v["_stream"].as_str().unwrap(), c.key);
                    lines.push(v);
                }
            }
            assert_eq!(n, batch.records);
        }
        let total = task.await.unwrap().unwrap();
        assert_eq!(total, 50_001);
        assert_eq!(lines.len(), 50_001);
        assert!(batches > 1, "one batch per read");
        let last = lines.iter().find(|v| v["message"] == "last line").unwrap();
        assert_eq!(last["_stream"], "_");
        let mut idx: Vec<i64> = lines.iter().filter_map(|v| v["i"].as_i64()).collect();
        idx.sort();
        assert_eq!(idx, (0..50_000).collect::<Vec<_>>());
    }
}
