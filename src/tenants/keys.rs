//! API keys: random secrets shown once at creation; only their SHA-256 is stored.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public identifier (for listing and revoking).
    pub id: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    pub created: u64,
}

/// SHA-256 hex of a presented key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key (`lethe-` + 48 hex characters, 192 bits) and its record.
pub fn generate() -> std::io::Result<(String, KeyRecord)> {
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    let key = format!("lethe-{}", hex::encode(secret));
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok((key.clone(), KeyRecord { id: format!("key_{}", hex::encode(id)), hash: hash_key(&key), created }))
}

/// Compares two secrets' hashes in constant time (for the admin key).
pub fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hashed() {
        let (k1, r1) = generate().unwrap();
        let (k2, r2) = generate().unwrap();
        assert_ne!(k1, k2);
        assert_ne!(r1.id, r2.id);
        assert_eq!(r1.hash, hash_key(&k1));
        assert!(!r1.hash.contains(&k1[6..]));
        assert!(same_hash(&r1.hash, &hash_key(&k1)));
        assert!(!same_hash(&r1.hash, &r2.hash));
    }
}
