//! The gossip keyring: the 32-byte ChaCha20-Poly1305 keys that seal every gossip packet.
//!
//! Owns parsing (a file of base64 keys, one per line) and key generation. The first key
//! encrypts; every key is tried to decrypt, so a key can be rotated without downtime:
//! 1. add the new key as a second line on every node and reload/restart them;
//! 2. move it to the first line on every node;
//! 3. remove the old key.
//!
//! Must not do any sealing itself (that is `packet.rs`) nor log key material: `Debug`
//! prints only short fingerprints.

use std::path::Path;

use base64::Engine as _;
use rand::RngCore as _;

/// Length of a gossip key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a keyring could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read gossip key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "gossip key on line {line} is not valid base64 ({reason}); \
         generate one with `logmesh keygen`"
    )]
    Base64 { line: usize, reason: String },
    #[error(
        "gossip key on line {line} decodes to {len} bytes, expected {KEY_LEN}; \
         generate one with `logmesh keygen`"
    )]
    Length { line: usize, len: usize },
    #[error(
        "the gossip keyring is empty: put at least one base64 key (from `logmesh keygen`) \
         in it, or run with --insecure"
    )]
    Empty,
}

/// The cluster keys. The first one encrypts, all of them decrypt.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("fingerprints", &self.fingerprints())
            .finish()
    }
}

impl Keyring {
    /// A keyring from raw keys; the first one encrypts.
    pub fn new(keys: Vec<[u8; KEY_LEN]>) -> Result<Keyring, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Keyring { keys })
    }

    /// Parse the text of a key file: one base64 key (32 bytes) per line. Blank lines and
    /// lines starting with `#` are ignored.
    pub fn parse(text: &str) -> Result<Keyring, KeyringError> {
        let engine = base64::engine::general_purpose::STANDARD;
        let mut keys = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = engine.decode(line).map_err(|e| KeyringError::Base64 {
                line: n + 1,
                reason: e.to_string(),
            })?;
            let key: [u8; KEY_LEN] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyringError::Length {
                        line: n + 1,
                        len: bytes.len(),
                    })?;
            keys.push(key);
        }
        Keyring::new(keys)
    }

    /// Read and parse a key file (see [`Keyring::parse`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Keyring, KeyringError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| KeyringError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Keyring::parse(&text)
    }

    /// The key that encrypts.
    pub fn primary(&self) -> &[u8; KEY_LEN] {
        &self.keys[0]
    }

    /// All keys, the encrypting one first.
    pub fn keys(&self) -> &[[u8; KEY_LEN]] {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Short, non-secret names of the keys (first 4 bytes of xxh3 of each key, hex), for
    /// logs and status output.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| format!("{:08x}", (xxhash_rust::xxh3::xxh3_64(k) >> 32) as u32))
            .collect()
    }
}

/// A new random key, base64-encoded: one line of a key file (for `logmesh keygen`).
pub fn generate_key() -> String {
    let mut key = [0u8; KEY_LEN];
    rand::rngs::OsRng.fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        let ring = Keyring::parse(&format!("# comment\n\n{a}\n  {b}  \n")).unwrap();
        assert_eq!(ring.len(), 2);
        assert_ne!(ring.keys()[0], ring.keys()[1]);
        assert_eq!(ring.fingerprints().len(), 2);
    }

    #[test]
    fn rejects_bad_keys_with_line_numbers() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        match Keyring::parse(&format!("{}\n{short}\n", generate_key())) {
            Err(KeyringError::Length { line: 2, len: 16 }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            Keyring::parse("not base64!!"),
            Err(KeyringError::Base64 { line: 1, .. })
        ));
        assert!(matches!(
            Keyring::parse("# only a comment\n"),
            Err(KeyringError::Empty)
        ));
    }

    #[test]
    fn debug_does_not_leak_keys() {
        let k = generate_key();
        let ring = Keyring::parse(&k).unwrap();
        let shown = format!("{ring:?}");
        assert!(!shown.contains(&k));
        assert!(!shown.contains(&format!("{:?}", ring.primary())));
    }

    #[test]
    fn from_file_reports_path() {
        let err = Keyring::from_file("/nonexistent/gossip.keys").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/gossip.keys"));
    }
}
