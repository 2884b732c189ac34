//! Sans-IO shared-key handshake of the Forward protocol, and the server's replies.
//!
//! Owns: [`Handshake`] (server side: `HELO` out, `PING` in, `PONG` out) and the msgpack
//! encoding of what the server sends (`HELO`, `PONG`, `{"ack": chunk}`). Must not: do I/O
//! or pick randomness itself (the caller passes the nonce).
//!
//! Protocol (Forward Protocol Specification v1, as fluentd's in_forward does it):
//! - server: `["HELO", {"nonce": <nonce>, "auth": "", "keepalive": true}]`
//! - client: `["PING", client_hostname, shared_key_salt,
//!   sha512_hex(shared_key_salt + client_hostname + nonce + shared_key), username, password]`
//! - server: `["PONG", true, "", server_hostname,
//!   sha512_hex(shared_key_salt + server_hostname + nonce + shared_key)]`, or
//!   `["PONG", false, <reason>, "", ""]` and the connection is closed.
//!
//! User authentication (username/password) is not supported: `auth` is empty and the
//! username and password of a PING are ignored.

use rmpv::Value;
use sha2::{Digest as _, Sha512};

use super::decode::Ping;

/// Server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    shared_key: String,
    self_hostname: String,
    nonce: String,
    done: bool,
}

/// What to answer a PING.
#[derive(Debug)]
pub struct Pong {
    pub bytes: Vec<u8>,
    /// False: the client failed; close after sending `bytes`.
    pub ok: bool,
    pub reason: &'static str,
}

impl Handshake {
    /// `nonce` must be fresh and unpredictable per connection (e.g. 16 random bytes as hex).
    pub fn new(shared_key: &str, self_hostname: &str, nonce: String) -> Self {
        Handshake {
            shared_key: shared_key.to_owned(),
            self_hostname: self_hostname.to_owned(),
            nonce,
            done: false,
        }
    }

    /// The `HELO` to send as soon as the connection is accepted.
    pub fn helo(&self) -> Vec<u8> {
        encode(&Value::Array(vec![
            Value::from("HELO"),
            Value::Map(vec![
                (Value::from("nonce"), Value::from(self.nonce.as_str())),
                (Value::from("auth"), Value::from("")),
                (Value::from("keepalive"), Value::from(true)),
            ]),
        ]))
    }

    /// True once a PING with the right digest was answered.
    pub fn authenticated(&self) -> bool {
        self.done
    }

    /// Check a PING and build the PONG.
    pub fn on_ping(&mut self, ping: &Ping) -> Pong {
        let expected = digest_hex(
            &ping.salt,
            ping.hostname.as_bytes(),
            self.nonce.as_bytes(),
            self.shared_key.as_bytes(),
        );
        if !ct_eq(expected.as_bytes(), ping.digest.as_bytes()) {
            return Pong {
                bytes: pong_fail("shared_key mismatch"),
                ok: false,
                reason: "shared_key mismatch",
            };
        }
        self.done = true;
        let ours = digest_hex(
            &ping.salt,
            self.self_hostname.as_bytes(),
            self.nonce.as_bytes(),
            self.shared_key.as_bytes(),
        );
        Pong {
            bytes: encode(&Value::Array(vec![
                Value::from("PONG"),
                Value::from(true),
                Value::from(""),
                Value::from(self.self_hostname.as_str()),
                Value::from(ours),
            ])),
            ok: true,
            reason: "",
        }
    }
}

fn pong_fail(reason: &str) -> Vec<u8> {
    encode(&Value::Array(vec![
        Value::from("PONG"),
        Value::from(false),
        Value::from(reason),
        Value::from(""),
        Value::from(""),
    ]))
}

/// `sha512_hex(salt + hostname + nonce + key)`.
pub fn digest_hex(salt: &[u8], hostname: &[u8], nonce: &[u8], key: &[u8]) -> String {
    let mut h = Sha512::new();
    h.update(salt);
    h.update(hostname);
    h.update(nonce);
    h.update(key);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 0xf) as usize] as char);
    }
    s
}

/// A fresh nonce: 16 random bytes as 32 hex characters.
pub fn new_nonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `{"ack": chunk}`.
pub fn ack(chunk: &str) -> Vec<u8> {
    encode(&Value::Map(vec![(Value::from("ack"), Value::from(chunk))]))
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // writing to a Vec cannot fail
    let _ = rmpv::encode::write_value(&mut out, v);
    out
}
