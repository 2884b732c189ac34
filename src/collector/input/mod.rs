//! Collector inputs (stdin, tail, ...). Each runs as a tokio task sending `InputBatch`es.
