//! What travels between sites: a signed change event, and the hybrid logical clock
//! version that orders changes of one object.
//!
//! A version is `WALL.COUNTER.SITE` with the wall clock in milliseconds (13 digits) and
//! the counter (6 digits) zero-padded, so versions compare as strings: later wall time
//! first, then the counter, then the site name as the tie-break every site agrees on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The wire format's version.
pub const FORMAT: u32 = 1;
/// The header carrying the publishing site.
pub const SITE_HEADER: &str = "x-labrelay-site";
/// The header carrying the HMAC-SHA256 of the body, hex.
pub const SIGNATURE_HEADER: &str = "x-labrelay-signature";

/// A version: `WALL.COUNTER.SITE`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub String);

impl Version {
    /// Build from parts.
    pub fn new(wall_ms: u64, counter: u64, site: &str) -> Version {
        Version(format!("{wall_ms:013}.{counter:06}.{site}"))
    }

    /// The lowest version of `site`: what bootstrap stamps on a field that was never
    /// changed since syncing began, so any real change anywhere wins over it.
    pub fn zero(site: &str) -> Version {
        Version::new(0, 0, site)
    }

    /// Wall clock and counter, if well formed.
    pub fn parts(&self) -> Option<(u64, u64, &str)> {
        let mut it = self.0.splitn(3, '.');
        let wall = it.next()?;
        let counter = it.next()?;
        let site = it.next()?;
        if wall.len() != 13 || counter.len() != 6 || site.is_empty() {
            return None;
        }
        Some((wall.parse().ok()?, counter.parse().ok()?, site))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The operation of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Create or change an object.
    Save,
    /// Delete an object (applied as a deactivation where deletes are not allowed).
    Delete,
    /// Add a link.
    Connect,
    /// Remove a link.
    Disconnect,
}

impl Op {
    /// The topic word.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Save => "save",
            Op::Delete => "delete",
            Op::Connect => "connect",
            Op::Disconnect => "disconnect",
        }
    }

    /// From the outbox's text.
    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "save" => Some(Op::Save),
            "delete" => Some(Op::Delete),
            "connect" => Some(Op::Connect),
            "disconnect" => Some(Op::Disconnect),
            _ => None,
        }
    }
}

/// A reference to an object: its uuid, plus where it was created and its key there, so
/// that its home site can find it even before it recorded the uuid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ref {
    /// The object's uuid.
    pub uuid: String,
    /// The site that created it.
    pub origin: String,
    /// Its key at the origin site.
    pub key: String,
}

/// One change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Wire format version.
    pub format: u32,
    /// Unique id (the inbox deduplicates by it).
    pub id: String,
    /// The publishing site (whose key signed it).
    pub site: String,
    /// Object or link type.
    #[serde(rename = "type")]
    pub object_type: String,
    /// What happened.
    pub op: Op,
    /// The object (for a link: the two ends).
    pub object: Ref,
    /// A link's right end (`object` is the left end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub right: Option<Ref>,
    /// The version of this change.
    pub version: Version,
    /// Changed fields (all fields when the object is new); references as [`Ref`].
    #[serde(default)]
    pub fields: BTreeMap<String, serde_json::Value>,
    /// Per-field versions when they differ from `version` (bootstrap and repair send the
    /// versions a site already holds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, Version>,
}

impl Event {
    /// The routing key: `SITE.TYPE.OP`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}.{}", self.site, self.object_type, self.op.as_str())
    }

    /// The version of one field of this event.
    pub fn field_version(&self, field: &str) -> &Version {
        self.versions.get(field).unwrap_or(&self.version)
    }

    /// The uuid a link is known by.
    pub fn link_id(left: &str, right: &str) -> String {
        format!("{left}+{right}")
    }
}

/// Sign a body with a site's key: hex HMAC-SHA256.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    labrelay::sign::hmac_sha256_hex(key, body)
}

/// Check a body's signature in constant time.
pub fn verify(key: &[u8], body: &[u8], signature_hex: &str) -> bool {
    labrelay::sign::verify_hmac_sha256(key, body, signature_hex)
}

/// The uuid of an object created at `site` with local key `key`: derived, so that every
/// run (and bootstrap, which writes nothing) gives the same one.
pub fn home_uuid(site: &str, object_type: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = Sha256::new()
        .chain_update(b"labrelay-sync\0")
        .chain_update(site.as_bytes())
        .chain_update(b"\0")
        .chain_update(object_type.as_bytes())
        .chain_update(b"\0")
        .chain_update(key.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// A hybrid logical clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clock {
    /// Milliseconds since the epoch.
    pub wall: u64,
    /// Counter within one millisecond.
    pub counter: u64,
}

/// Milliseconds since the epoch now.
pub fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

impl Clock {
    /// The next version for a local change at wall time `now`.
    pub fn tick(&mut self, now: u64) {
        if now > self.wall {
            self.wall = now;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
    }

    /// Move past a version seen from another site.
    pub fn observe(&mut self, wall: u64, counter: u64) {
        if (wall, counter) > (self.wall, self.counter) {
            self.wall = wall;
            self.counter = counter;
        }
    }

    /// This clock as a version of `site`.
    pub fn version(&self, site: &str) -> Version {
        Version::new(self.wall, self.counter, site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_counter_then_site() {
        let a = Version::new(1_700_000_000_000, 0, "a");
        let b = Version::new(1_700_000_000_000, 0, "b");
        let a1 = Version::new(1_700_000_000_000, 1, "a");
        let later = Version::new(1_700_000_000_001, 0, "a");
        assert!(a < b && b < a1 && a1 < later);
        assert!(Version::zero("z") < a);
        assert_eq!(a1.parts(), Some((1_700_000_000_000, 1, "a")));
        assert_eq!(Version("x".into()).parts(), None);
    }

    #[test]
    fn clock_ticks_forward_even_when_the_wall_clock_goes_back() {
        let mut c = Clock::default();
        c.tick(100);
        assert_eq!((c.wall, c.counter), (100, 0));
        c.tick(90);
        assert_eq!((c.wall, c.counter), (100, 1));
        c.observe(200, 5);
        c.tick(150);
        assert_eq!((c.wall, c.counter), (200, 6));
    }

    #[test]
    fn signatures_check_the_key_and_the_body() {
        let sig = sign(b"k1", b"body");
        assert!(verify(b"k1", b"body", &sig));
        assert!(!verify(b"k2", b"body", &sig));
        assert!(!verify(b"k1", b"bodx", &sig));
        assert!(!verify(b"k1", b"body", "zz"));
    }

    #[test]
    fn home_uuids_are_stable_and_distinct() {
        let a = home_uuid("a", "user", "1");
        assert_eq!(a, home_uuid("a", "user", "1"));
        assert_ne!(a, home_uuid("b", "user", "1"));
        assert_ne!(a, home_uuid("a", "lab", "1"));
        assert_eq!(a.len(), 36);
    }
}
