//! HMAC-SHA256 signatures, as lowercase hex: sync events between sites, signed HTTP
//! requests to `job-worker serve`, and webhook bodies all use these two functions.

use hmac::{Hmac, Mac};
use sha2::Sha256;

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of every length, so this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"))
}

/// The hex HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    let mut m = mac(key);
    m.update(message);
    hex::encode(m.finalize().into_bytes())
}

/// Whether `signature_hex` is the HMAC-SHA256 of `message` under `key`, compared in
/// constant time. Anything that is not hex is simply wrong.
pub fn verify_hmac_sha256(key: &[u8], message: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let mut m = mac(key);
    m.update(message);
    m.verify_slice(&sig).is_ok()
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_refuses_other_key_body_and_garbage() {
        let sig = hmac_sha256_hex(b"k1", b"body");
        assert!(verify_hmac_sha256(b"k1", b"body", &sig));
        assert!(!verify_hmac_sha256(b"k2", b"body", &sig));
        assert!(!verify_hmac_sha256(b"k1", b"bodx", &sig));
        assert!(!verify_hmac_sha256(b"k1", b"body", "zz"));
        assert!(!verify_hmac_sha256(b"k1", b"body", &sig[..10]));
    }

    #[test]
    fn sha256_of_nothing() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
