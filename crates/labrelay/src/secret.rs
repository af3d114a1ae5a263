//! Secrets: a value type that never prints itself, where secrets come from, and URLs
//! whose passwords are masked when shown.
//!
//! A secret in the configuration is written as one of
//! - `env:NAME`  — read from the environment variable `NAME` when it is needed;
//! - `file:PATH` — the first line of `PATH`, which must not be group- or world-readable;
//! - anything else — the literal value (the config loader warns when the file holding
//!   it is readable by others).
//!
//! This module must never log, format or return a secret's value except through
//! [`Secret::expose`]; Debug and Display print `****`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::exit::Exit;

/// The mask shown in place of a secret.
pub const MASK: &str = "****";

/// A secret value (password, key, token). Debug and Display never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        let s = Secret(value.into());
        register(&s);
        s
    }

    /// The value itself. Call this only where the value leaves the process for the
    /// server that needs it (a login, a signature), never for output.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({MASK})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// Secret values seen by this process, so that log lines and error messages can be
/// scrubbed of them even when a dependency formats one by accident (a driver that logs
/// its connection string, an error that echoes a URL). Values shorter than 4 bytes are
/// not registered: masking every "a" would make logs unreadable and such a value is no
/// secret anyway.
static KNOWN: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

fn register(s: &Secret) {
    if s.0.len() < 4 {
        return;
    }
    let mut known = KNOWN
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !known.contains(&s.0) {
        known.push(s.0.clone());
        // Percent-encoded form, as it appears inside URLs.
        let enc: String = url::form_urlencoded::byte_serialize(s.0.as_bytes()).collect();
        if enc != s.0 {
            known.push(enc);
        }
    }
}

/// Replace every registered secret value in `text` with [`MASK`].
pub fn scrub(text: &str) -> std::borrow::Cow<'_, str> {
    let known = KNOWN
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !known.iter().any(|k| text.contains(k.as_str())) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = text.to_owned();
    for k in known.iter() {
        out = out.replace(k.as_str(), MASK);
    }
    std::borrow::Cow::Owned(out)
}

/// Errors resolving a secret. None of them contains the secret's value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// `env:NAME` named a variable that is not set.
    #[error("secret environment variable {0} is not set")]
    EnvMissing(String),
    /// `file:PATH` could not be read.
    #[error("cannot read secret file {path}: {source}")]
    FileUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `file:PATH` is readable by group or others.
    #[error(
        "secret file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    FileTooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The secret resolved to an empty value.
    #[error("secret from {0} is empty")]
    Empty(String),
}

impl SecretError {
    /// Every secret problem is a configuration problem.
    pub fn exit(&self) -> Exit {
        Exit::Config
    }
}

/// Where a secret comes from, as written in the configuration. Resolved only when a
/// tool needs it, so a missing variable for an unused section is not an error.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSpec {
    /// `env:NAME`.
    Env(String),
    /// `file:PATH`.
    File(PathBuf),
    /// A literal value.
    Literal(Secret),
}

impl SecretSpec {
    /// Parse the configuration syntax.
    pub fn parse(text: &str) -> Self {
        if let Some(name) = text.strip_prefix("env:") {
            SecretSpec::Env(name.to_owned())
        } else if let Some(path) = text.strip_prefix("file:") {
            SecretSpec::File(PathBuf::from(path))
        } else {
            SecretSpec::Literal(Secret::new(text))
        }
    }

    /// Whether the value is written in the config file itself.
    pub fn is_literal(&self) -> bool {
        matches!(self, SecretSpec::Literal(_))
    }

    /// Fetch the value.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSpec::Literal(s) => Ok(s.clone()),
            SecretSpec::Env(name) => match std::env::var(name) {
                Ok(v) if v.is_empty() => Err(SecretError::Empty(format!("env:{name}"))),
                Ok(v) => Ok(Secret::new(v)),
                Err(_) => Err(SecretError::EnvMissing(name.clone())),
            },
            SecretSpec::File(path) => read_secret_file(path),
        }
    }
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSpec::Env(n) => write!(f, "env:{n}"),
            SecretSpec::File(p) => write!(f, "file:{}", p.display()),
            SecretSpec::Literal(_) => f.write_str(MASK),
        }
    }
}

impl<'de> serde::Deserialize<'de> for SecretSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(SecretSpec::parse(&s))
    }
}

fn read_secret_file(path: &Path) -> Result<Secret, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| SecretError::FileUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::FileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::FileUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let value = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if value.is_empty() {
        return Err(SecretError::Empty(format!("file:{}", path.display())));
    }
    Ok(Secret::new(value))
}

/// A URL whose Display and Debug mask the password (and any `password`, `secret`,
/// `token` or `key` query parameter), for logs and errors.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(url::Url);

impl RedactedUrl {
    /// Wrap a URL.
    pub fn new(url: url::Url) -> Self {
        let u = RedactedUrl(url);
        let _ = u.password();
        u
    }

    /// Parse a URL; the error message never contains the input (it may hold a password).
    pub fn parse(text: &str) -> Result<Self, url::ParseError> {
        url::Url::parse(text).map(RedactedUrl::new)
    }

    /// The full URL with its password, for handing to a client library.
    pub fn expose(&self) -> &url::Url {
        &self.0
    }

    /// A copy with the password replaced by `password`.
    #[must_use]
    pub fn with_password(&self, password: &Secret) -> Self {
        let mut u = self.0.clone();
        // set_password fails only for URLs that cannot have credentials (e.g. `file:`),
        // where there is nothing to set.
        let _ = u.set_password(Some(password.expose()));
        RedactedUrl::new(u)
    }

    /// The password in the URL, if any.
    pub fn password(&self) -> Option<Secret> {
        self.0
            .password()
            .map(|p| Secret::new(percent_decode(p).unwrap_or_else(|| p.to_owned())))
    }

    /// Whether the URL itself holds a secret: a password (`mysql://u:pw@host/db`) or a
    /// query parameter whose name says it is one (`password`, `secret`, `token`), with
    /// a value. The config loader warns about such a URL in a file others can read.
    pub fn holds_secret(&self) -> bool {
        let named_secret = |k: &str| {
            let k = k.to_ascii_lowercase();
            ["password", "secret", "token"]
                .iter()
                .any(|s| k.contains(s))
        };
        self.0.password().is_some_and(|p| !p.is_empty())
            || self
                .0
                .query_pairs()
                .any(|(k, v)| named_secret(&k) && !v.is_empty())
    }

    /// The URL as it may be shown.
    pub fn redacted(&self) -> String {
        let mut u = self.0.clone();
        if u.password().is_some() {
            let _ = u.set_password(Some(MASK));
        }
        let sensitive = |k: &str| {
            let k = k.to_ascii_lowercase();
            [
                "password",
                "secret",
                "token",
                "key",
                "signature",
                "credential",
            ]
            .iter()
            .any(|s| k.contains(s))
        };
        if u.query().is_some() {
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if sensitive(&k) {
                        MASK.to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
        u.to_string()
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedactedUrl({})", self.redacted())
    }
}

impl<'de> serde::Deserialize<'de> for RedactedUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RedactedUrl::parse(&s).map_err(|e| {
            serde::de::Error::custom(format!("invalid URL ({e}): {}", redact_unparsed(&s)))
        })
    }
}

/// Mask what looks like a password in a string that did not parse as a URL
/// (`scheme://user:PASSWORD@host`).
pub fn redact_unparsed(s: &str) -> String {
    if let Some(scheme_end) = s.find("://") {
        let rest = &s[scheme_end + 3..];
        if let Some(at) = rest.rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            return format!(
                "{}{}:{MASK}{}",
                &s[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            );
        }
    }
    s.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), MASK);
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
        let spec = SecretSpec::parse("hunter2");
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn scrub_masks_registered_values() {
        let s = Secret::new("zebra-horse-42");
        let line = format!("connecting with {} and {}", s.expose(), "zebra-horse-42");
        assert_eq!(scrub(&line), "connecting with **** and ****");
        assert_eq!(scrub("nothing here"), "nothing here");
    }

    #[test]
    fn url_password_and_sensitive_query_are_masked() {
        let u = RedactedUrl::parse("amqp://guest:p%40ss@127.0.0.1:5672/%2f?token=abc&x=1").unwrap();
        let shown = u.to_string();
        assert!(
            !shown.contains("p%40ss") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(shown.contains("guest:****@127.0.0.1"), "{shown}");
        assert!(shown.contains("x=1"));
        assert_eq!(u.password().unwrap().expose(), "p@ss");
        assert!(!format!("{u:?}").contains("p%40ss"));
    }

    #[test]
    fn unparsable_url_is_masked_too() {
        assert_eq!(
            redact_unparsed("mysql://root:topsecret@db:bad/x"),
            "mysql://root:****@db:bad/x"
        );
        let err = toml::from_str::<std::collections::BTreeMap<String, RedactedUrl>>(
            "u = \"mysql://root:topsecret@db:99999999/x\"",
        )
        .unwrap_err();
        let err = err.message();
        assert!(!err.contains("topsecret"), "{err}");
    }

    #[test]
    fn env_secret_is_resolved_late_and_named_when_missing() {
        let spec = SecretSpec::parse("env:LABRELAY_TEST_SURELY_UNSET_VAR");
        let err = spec.resolve().unwrap_err().to_string();
        assert!(err.contains("LABRELAY_TEST_SURELY_UNSET_VAR"));
    }

    #[test]
    fn secret_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretSpec::File(p.clone()).resolve().unwrap_err();
        assert!(matches!(err, SecretError::FileTooOpen { .. }));
        assert!(!err.to_string().contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(SecretSpec::File(p).resolve().unwrap().expose(), "s3cret");
    }
}

impl crate::exit::ExitClass for SecretError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }
}
crate::exit_class!(SecretError);
