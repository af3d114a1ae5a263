//! The signed requests of `job-worker serve`, shared by the server and the client.
//!
//! A request carries
//! `Authorization: LABRELAY-HMAC-SHA256 user=NAME, ts=UNIX_SECONDS, nonce=NONCE, sig=HEX`,
//! where `sig` is the hex HMAC-SHA256, under the user's key, of these lines joined by
//! `\n`: the scheme name, the method, the path as sent (percent-encoded), the raw query
//! string as sent (empty when there is none), the hex SHA-256 of the body, `ts` and
//! `nonce`. No password crosses the wire; a signature is good for ±[`WINDOW_SECS`]
//! around the server's clock and once (the server remembers each nonce for the window).

use labrelay::secret::Secret;
use serde::{Deserialize, Serialize};

/// The scheme name, first in the header and in the string to sign.
pub const SCHEME: &str = "LABRELAY-HMAC-SHA256";

/// How far a request's `ts` may be from the server's clock, either way.
pub const WINDOW_SECS: i64 = 60;

/// Keys shorter than this are refused at start.
pub const MIN_KEY_LEN: usize = 16;

/// What a signature covers of the request itself.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The method.
    pub method: &'a str,
    /// The path as sent (percent-encoded).
    pub path: &'a str,
    /// The raw query string as sent, `""` when none.
    pub query: &'a str,
    /// The body bytes.
    pub body: &'a [u8],
}

/// The string a signature covers.
pub fn string_to_sign(req: &Target<'_>, ts: i64, nonce: &str) -> String {
    format!(
        "{SCHEME}\n{}\n{}\n{}\n{}\n{ts}\n{nonce}",
        req.method.to_ascii_uppercase(),
        req.path,
        req.query,
        labrelay::sign::sha256_hex(req.body)
    )
}

/// The `Authorization` header value of a request.
pub fn authorization(user: &str, key: &Secret, req: &Target<'_>, ts: i64, nonce: &str) -> String {
    let sig = labrelay::sign::hmac_sha256_hex(
        key.expose().as_bytes(),
        string_to_sign(req, ts, nonce).as_bytes(),
    );
    format!("{SCHEME} user={user}, ts={ts}, nonce={nonce}, sig={sig}")
}

/// A fresh nonce: 32 random hex digits.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The parts of an `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Who signed.
    pub user: String,
    /// When (Unix seconds).
    pub ts: i64,
    /// Once-only value.
    pub nonce: String,
    /// Hex signature.
    pub sig: String,
}

/// Whether `s` can be a user name: 1 to 64 of `A-Z a-z 0-9 . _ @ -`.
pub fn is_user_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// Parse the header value; the error says what is wrong (never echoing the value).
pub fn parse_authorization(value: &str) -> Result<Credentials, &'static str> {
    let rest = value
        .strip_prefix(SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or("the Authorization scheme must be LABRELAY-HMAC-SHA256")?;
    let (mut user, mut ts, mut nonce, mut sig) = (None, None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or("Authorization parts are key=value, separated by commas")?;
        let slot = match k {
            "user" => &mut user,
            "ts" => &mut ts,
            "nonce" => &mut nonce,
            "sig" => &mut sig,
            _ => return Err("Authorization has an unknown part (user, ts, nonce, sig)"),
        };
        if slot.replace(v.to_owned()).is_some() {
            return Err("Authorization repeats a part");
        }
    }
    let user = user.ok_or("Authorization has no user")?;
    if !is_user_name(&user) {
        return Err("Authorization user is not a user name");
    }
    let ts = ts
        .ok_or("Authorization has no ts")?
        .parse::<i64>()
        .map_err(|_| "Authorization ts is not Unix seconds")?;
    let nonce = nonce.ok_or("Authorization has no nonce")?;
    if !(16..=64).contains(&nonce.len())
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("Authorization nonce must be 16 to 64 of A-Z a-z 0-9 - _");
    }
    let sig = sig.ok_or("Authorization has no sig")?;
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("Authorization sig must be 64 hex digits");
    }
    Ok(Credentials {
        user,
        ts,
        nonce,
        sig,
    })
}

/// Whether `sig` signs the request under `key` (constant-time compare).
pub fn verify(key: &Secret, creds: &Credentials, req: &Target<'_>) -> bool {
    labrelay::sign::verify_hmac_sha256(
        key.expose().as_bytes(),
        string_to_sign(req, creds.ts, &creds.nonce).as_bytes(),
        &creds.sig,
    )
}

/// `POST /v1/jobs`: a submission.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Registered task.
    pub task: String,
    /// Its arguments.
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Not before (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i64,
    /// Mail the outcome here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// POST the outcome to this `[jobs.webhooks.NAME]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

/// `POST /v1/jobs/batch`: many submissions in one request (`code-submit task --each`
/// through a remote server). No unique keys; at most [`MAX_BATCH`] jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The jobs, each as `POST /v1/jobs` takes one.
    pub jobs: Vec<SubmitRequest>,
}

/// The answer to a batch: the new jobs' ids, in the request's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchSubmitted {
    /// One id per job of the request.
    pub ids: Vec<i64>,
}

/// Jobs per `POST /v1/jobs/batch`.
pub const MAX_BATCH: usize = 1000;

/// The answer to a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    /// The job (the earlier one when the unique key was used).
    pub id: i64,
    /// The task.
    pub task: String,
    /// False when the unique key was used before.
    pub created: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_round_trip_and_tamper() {
        let key = Secret::new("0123456789abcdef-key");
        let t = |method, path, query, body| Target {
            method,
            path,
            query,
            body,
        };
        let h = authorization(
            "alice",
            &key,
            &t("post", "/v1/jobs", "", b"{}"),
            1_700_000_000,
            "n0nce-n0nce-n0nce",
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.ts, 1_700_000_000);
        assert!(verify(&key, &c, &t("POST", "/v1/jobs", "", b"{}")));
        assert!(!verify(&key, &c, &t("POST", "/v1/jobs", "", b"{ }")));
        assert!(!verify(&key, &c, &t("GET", "/v1/jobs", "", b"{}")));
        assert!(!verify(&key, &c, &t("POST", "/v1/jobs/1", "", b"{}")));
        assert!(!verify(&key, &c, &t("POST", "/v1/jobs", "a=1", b"{}")));
        let other = Secret::new("another-key-of-16+");
        assert!(!verify(&other, &c, &t("POST", "/v1/jobs", "", b"{}")));
    }

    #[test]
    fn malformed_headers_are_named() {
        for bad in [
            "Basic YWxpY2U6cHc=",
            "LABRELAY-HMAC-SHA256 user=alice",
            "LABRELAY-HMAC-SHA256 user=a/b, ts=1, nonce=0123456789abcdef, sig=00",
            "LABRELAY-HMAC-SHA256 user=alice, ts=x, nonce=0123456789abcdef, sig=00",
            "LABRELAY-HMAC-SHA256 user=alice, ts=1, nonce=short, sig=00",
            "LABRELAY-HMAC-SHA256 user=alice, user=bob, ts=1, nonce=0123456789abcdef, sig=00",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad}");
        }
    }
}
