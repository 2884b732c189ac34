//! File sink: one NDJSON file per stream key under an output directory, appended to.
//!
//! Exactly-once across crashes: before appending a batch it durably records, in
//! `<out_dir>/.logmesh-file-sink.state`, the current length of every file the batch touches
//! ("pending"); after appending and fsyncing those files it records the batch's end sequence
//! with no pending files. On open it truncates pending files back to their recorded lengths
//! and reports its position, so a replayed tail is written once. A failed write is undone
//! the same way before the retry.
//!
//! File names come from [`stream_file_name`] (percent-encoding, never a path separator, never
//! a leading dot). At most `max_open` file handles stay open (least recently used closed).
//! The blocking file I/O runs on tokio's blocking pool. Rotation is not done here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{write_atomic, Sink, SinkBatch, SinkError, SinkFuture};

const STATE_FILE: &str = ".logmesh-file-sink.state";
const STATE_MAGIC: &str = "logmesh-file-sink 1";
/// Longest encoded stem before it is cut and suffixed with a hash.
const MAX_STEM: usize = 200;
/// Default cap on open file handles.
pub const DEFAULT_MAX_OPEN: usize = 256;

/// Safe, injective file name for a stream key: bytes outside `[A-Za-z0-9._-]` (and a
/// leading `.`) become `%XX`; the empty key is `%empty`; stems longer than 200 bytes are cut
/// and end in `~` + 16 hex digits of the key's xxh3 hash. Always ends in `.ndjson`.
pub fn stream_file_name(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 8);
    if key.is_empty() {
        s.push_str("%empty");
    }
    for (i, b) in key.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    if s.len() > MAX_STEM {
        s.truncate(MAX_STEM - 17);
        let _ = write!(s, "~{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes()));
    }
    s.push_str(".ndjson");
    s
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    len: u64,
    used: u64,
    unsynced: bool,
}

#[derive(Debug)]
struct State {
    dir: PathBuf,
    max_open: usize,
    files: HashMap<String, OpenFile>,
    tick: u64,
    /// First WAL sequence not yet held.
    next: Option<u64>,
    /// Files being appended to, with their lengths before the batch.
    pending: Vec<(String, u64)>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct FileSink {
    name: String,
    state: Arc<Mutex<State>>,
}

impl FileSink {
    /// A sink named `file` writing into `out_dir` (created if missing).
    pub fn new(out_dir: impl Into<PathBuf>) -> Result<FileSink, SinkError> {
        let dir = out_dir.into();
        fs::create_dir_all(&dir)?;
        Ok(FileSink {
            name: "file".into(),
            state: Arc::new(Mutex::new(State {
                dir,
                max_open: DEFAULT_MAX_OPEN,
                files: HashMap::new(),
                tick: 0,
                next: None,
                pending: Vec::new(),
            })),
        })
    }

    /// Use another name (needed when several file sinks share one store).
    pub fn with_name(mut self, name: impl Into<String>) -> FileSink {
        self.name = name.into();
        self
    }

    /// Cap on open file handles (at least 1).
    pub fn with_max_open(self, n: usize) -> FileSink {
        if let Ok(mut s) = self.state.lock() {
            s.max_open = n.max(1);
        }
        self
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, SinkError> + Send + 'static,
    ) -> SinkFuture<'static, T> {
        let state = self.state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut s = state
                    .lock()
                    .map_err(|_| SinkError::Other("file sink state poisoned by a panic".into()))?;
                f(&mut s)
            })
            .await
            .map_err(|e| SinkError::Other(format!("file sink task failed: {e}")))?
        })
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&mut self) -> SinkFuture<'_, Option<u64>> {
        self.run(|s| {
            s.load()?;
            s.undo_pending()?;
            Ok(s.next)
        })
    }

    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        self.run(move |s| s.write(&batch))
    }

    fn rewind(&mut self, next_seq: u64) -> SinkFuture<'_, ()> {
        self.run(move |s| {
            s.next = Some(next_seq);
            s.save()
        })
    }

    fn close(&mut self) -> SinkFuture<'_, ()> {
        self.run(|s| {
            for f in s.files.values_mut() {
                if f.unsynced {
                    f.file.sync_data()?;
                    f.unsynced = false;
                }
            }
            s.files.clear();
            Ok(())
        })
    }
}

/// fdatasync every file written since its last sync, several at a time (the device handles
/// concurrent flushes much better than a sequence of them).
fn sync_all_unsynced(files: &mut HashMap<String, OpenFile>) -> Result<(), SinkError> {
    let mut dirty: Vec<&mut OpenFile> = files.values_mut().filter(|f| f.unsynced).collect();
    const THREADS: usize = 8;
    if dirty.len() <= 2 {
        for f in dirty {
            f.file.sync_data()?;
            f.unsynced = false;
        }
        return Ok(());
    }
    let per = dirty.len().div_ceil(THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = dirty
            .chunks_mut(per)
            .map(|part| {
                scope.spawn(move || -> std::io::Result<()> {
                    for f in part.iter_mut() {
                        f.file.sync_data()?;
                        f.unsynced = false;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| SinkError::Other("fsync thread panicked".into()))??;
        }
        Ok(())
    })
}

fn bad_state(path: &Path, why: &str) -> SinkError {
    SinkError::Other(format!(
        "file sink state {} is unreadable ({why}); remove it only if the output files may receive duplicates",
        path.display()
    ))
}

impl State {
    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn load(&mut self) -> Result<(), SinkError> {
        let path = self.state_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut lines = text.lines();
        if lines.next() != Some(STATE_MAGIC) {
            return Err(bad_state(&path, "wrong header"));
        }
        self.pending.clear();
        for line in lines {
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("next"), Some(n), None) => {
                    self.next = Some(n.parse().map_err(|_| bad_state(&path, "bad next"))?);
                }
                (Some("pending"), Some(len), Some(name))
                    if !name.contains('/') && !name.starts_with('.') =>
                {
                    let len = len.parse().map_err(|_| bad_state(&path, "bad length"))?;
                    self.pending.push((name.to_string(), len));
                }
                _ => return Err(bad_state(&path, "unknown line")),
            }
        }
        Ok(())
    }

    fn save(&self) -> Result<(), SinkError> {
        let mut text = String::from(STATE_MAGIC);
        text.push('\n');
        if let Some(n) = self.next {
            let _ = writeln!(text, "next {n}");
        }
        for (name, len) in &self.pending {
            let _ = writeln!(text, "pending {len} {name}");
        }
        write_atomic(&self.state_path(), text.as_bytes())?;
        Ok(())
    }

    /// Truncate every pending file back to its recorded length.
    fn undo_pending(&mut self) -> Result<(), SinkError> {
        for (name, len) in std::mem::take(&mut self.pending) {
            let path = self.dir.join(&name);
            match OpenOptions::new().write(true).open(&path) {
                Ok(f) => {
                    if f.metadata()?.len() > len {
                        tracing::info!(file = %path.display(), len, "file sink: removing a partly written batch before replay");
                        f.set_len(len)?;
                        f.sync_data()?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(open) = self.files.get_mut(&name) {
                open.len = open.len.min(len);
            }
        }
        Ok(())
    }

    fn current_len(&self, name: &str) -> Result<u64, SinkError> {
        if let Some(f) = self.files.get(name) {
            return Ok(f.len);
        }
        match fs::metadata(self.dir.join(name)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// The open handle for `name`, opening it (and closing the least recently used one if at
    /// the cap). Sets `created` when the file did not exist.
    fn handle(&mut self, name: &str, created: &mut bool) -> Result<&mut OpenFile, SinkError> {
        self.tick += 1;
        if !self.files.contains_key(name) {
            if self.files.len() >= self.max_open {
                let lru = self
                    .files
                    .iter()
                    .min_by_key(|(_, f)| f.used)
                    .map(|(n, _)| n.clone());
                if let Some(mut old) = lru.and_then(|n| self.files.remove(&n)) {
                    if old.unsynced {
                        old.file.sync_data()?;
                        old.unsynced = false;
                    }
                }
            }
            let path = self.dir.join(name);
            let existed = path.exists();
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let len = file.metadata()?.len();
            *created |= !existed;
            self.files.insert(
                name.to_string(),
                OpenFile {
                    file,
                    len,
                    used: 0,
                    unsynced: false,
                },
            );
        }
        let tick = self.tick;
        let f = self
            .files
            .get_mut(name)
            .ok_or_else(|| SinkError::Other("file handle vanished".into()))?;
        f.used = tick;
        Ok(f)
    }

    fn write(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        // Undo what a failed earlier attempt may have appended.
        self.undo_pending()?;
        if !batch.partial && self.next.is_some_and(|n| batch.last_seq < n) {
            return Ok(()); // already held (replay after restart)
        }
        let names: Vec<String> = batch
            .streams
            .iter()
            .map(|s| stream_file_name(&s.key))
            .collect();
        let mut pending = Vec::with_capacity(names.len());
        for n in &names {
            pending.push((n.clone(), self.current_len(n)?));
        }
        self.pending = pending;
        self.save()?;
        let mut created = false;
        for (stream, name) in batch.streams.iter().zip(&names) {
            let f = self.handle(name, &mut created)?;
            f.file.write_all(&stream.data)?;
            f.len += stream.data.len() as u64;
            f.unsynced = true;
        }
        sync_all_unsynced(&mut self.files)?;
        if created {
            File::open(&self.dir)?.sync_all()?;
        }
        self.next = Some(batch.last_seq + 1);
        self.pending.clear();
        self.save()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::aggregator::sink::SinkStream;
    use proptest::prelude::*;

    fn is_safe(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && name.ends_with(".ndjson")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-%~".contains(&b))
    }

    #[test]
    fn names_examples() {
        assert_eq!(stream_file_name("ns/app"), "ns%2Fapp.ndjson");
        assert_eq!(stream_file_name(".."), "%2E..ndjson");
        assert_eq!(stream_file_name(""), "%empty.ndjson");
        assert_eq!(stream_file_name("a b%"), "a%20b%25.ndjson");
        let long = "x".repeat(1000);
        let n = stream_file_name(&long);
        assert!(is_safe(&n) && n.contains('~'), "{n}");
        assert_ne!(n, stream_file_name(&"x".repeat(999)));
    }

    proptest! {
        #[test]
        fn prop_names_safe_and_injective(a in ".{0,80}", b in ".{0,80}", long in "[a-z/]{150,400}") {
            for k in [&a, &b, &long] {
                prop_assert!(is_safe(&stream_file_name(k)), "{:?}", k);
            }
            if a != b {
                prop_assert_ne!(stream_file_name(&a), stream_file_name(&b));
            }
            let mut long2 = long.clone();
            long2.push('y');
            prop_assert_ne!(stream_file_name(&long), stream_file_name(&long2));
        }
    }

    fn batch(first: u64, last: u64, streams: &[(&str, &str)]) -> Arc<SinkBatch> {
        Arc::new(SinkBatch {
            first_seq: first,
            last_seq: last,
            records: streams.len() as u64,
            streams: streams
                .iter()
                .map(|(k, d)| SinkStream {
                    key: k.to_string(),
                    count: 1,
                    data: d.as_bytes().to_vec(),
                })
                .collect(),
            partial: false,
        })
    }

    #[tokio::test]
    async fn appends_and_undoes_a_torn_batch_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = FileSink::new(tmp.path()).unwrap().with_max_open(1);
        assert_eq!(s.open().await.unwrap(), None);
        s.write(batch(1, 2, &[("a", "1\n"), ("b/c", "2\n")]))
            .await
            .unwrap();
        s.write(batch(3, 3, &[("a", "3\n")])).await.unwrap();
        // replay of something already held is ignored
        s.write(batch(1, 2, &[("a", "1\n")])).await.unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join("a.ndjson")).unwrap(),
            "1\n3\n"
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join("b%2Fc.ndjson")).unwrap(),
            "2\n"
        );
        // simulate a crash mid-batch: intent written, data partly appended
        {
            let mut st = s.state.lock().unwrap();
            st.pending = vec![("a.ndjson".into(), 4)];
            st.save().unwrap();
        }
        fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join("a.ndjson"))
            .unwrap()
            .write_all(b"partial")
            .unwrap();
        let mut s2 = FileSink::new(tmp.path()).unwrap();
        assert_eq!(s2.open().await.unwrap(), Some(4));
        assert_eq!(
            fs::read_to_string(tmp.path().join("a.ndjson")).unwrap(),
            "1\n3\n"
        );
        s2.write(batch(4, 4, &[("a", "4\n")])).await.unwrap();
        s2.close().await.unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join("a.ndjson")).unwrap(),
            "1\n3\n4\n"
        );
    }
}
