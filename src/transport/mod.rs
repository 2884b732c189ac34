//! QUIC + mutual TLS between nodes, and certificate creation.
