//! Whether a request's sender is who the From header says, by `[mail_query] trust`:
//!
//! - `dkim`: a DKIM signature that verifies (mail-auth) and whose `d=` domain is aligned
//!   with the From domain (the same domain, or a parent of it with at least two labels).
//!   Signatures with a body length limit (`l=`) are not accepted: text appended after
//!   the signed part could carry other SQL. Keys come from DNS, or from
//!   `[mail_query.dkim_keys]` for the names listed there.
//! - `authentication-results`: the topmost `Authentication-Results` header whose
//!   authserv-id is `authserv_id` (our own MTA's) must say `dmarc=pass`, or `dkim=pass`
//!   with an aligned `header.d`/`header.i`. Headers from other hosts are ignored.
//! - `allowlist`: no check here (a warning at every start).
//!
//! In every mode the From address must then be on the database's allowlist
//! ([`allowed`]); that check is the caller's.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

use labrelay::mail::IncomingMail;
use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::common::resolver::IntoFqdn as _;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, ResolverCache, Txt};

use crate::config::{MailQueryConfig, Trust};

/// The trust verdict on a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The sender is authenticated; how.
    Trusted(String),
    /// The sender is not; why.
    Untrusted(String),
    /// The check could not be made now (a DNS failure): try again later.
    Unknown(String),
}

/// Whether `address` is on `allow` (exact addresses and `@domain` entries; any case).
pub fn allowed(allow: &[String], address: &str) -> bool {
    let address = address.trim().to_lowercase();
    let domain = address.rsplit_once('@').map(|(_, d)| d.to_owned());
    allow.iter().any(|entry| {
        let entry = entry.to_lowercase();
        match entry.strip_prefix('@') {
            Some(d) => domain.as_deref() == Some(d),
            None => entry == address,
        }
    })
}

/// `signer` (a DKIM `d=` domain) is aligned with `from_domain` (relaxed alignment without
/// a public suffix list: the same domain, or a parent domain of at least two labels).
pub fn aligned(signer: &str, from_domain: &str) -> bool {
    let s = signer.trim().trim_end_matches('.').to_lowercase();
    let f = from_domain.trim().trim_end_matches('.').to_lowercase();
    if s.is_empty() {
        return false;
    }
    s == f || (s.contains('.') && f.ends_with(&format!(".{s}")))
}

/// DKIM keys given in the configuration, answered before DNS.
#[derive(Default)]
struct StaticKeys(HashMap<String, Txt>);

impl ResolverCache<String, Txt> for StaticKeys {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }

    fn remove<Q>(&self, _name: &Q) -> Option<Txt>
    where
        String: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _key: String, _value: Txt, _valid_until: Instant) {}
}

/// The sender check of one configuration.
pub struct Checker {
    trust: Trust,
    authserv_id: Option<String>,
    keys: StaticKeys,
    resolver: Option<MessageAuthenticator>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("trust", &self.trust)
            .field("static_keys", &self.keys.0.len())
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// A checker for `config`. Static DKIM keys were validated with the configuration.
    ///
    /// # Errors
    /// The system resolver configuration cannot be read (`trust = "dkim"` only).
    pub fn new(config: &MailQueryConfig) -> anyhow::Result<Checker> {
        let mut keys = HashMap::new();
        for (name, record) in &config.dkim_keys {
            let key = mail_auth::common::verify::DomainKey::parse(record.as_bytes())
                .map_err(|e| anyhow::anyhow!("[mail_query.dkim_keys] {name:?}: {e}"))?;
            let txt: Txt = key.into();
            let fqdn = name.as_str().into_fqdn().into_owned();
            keys.insert(fqdn.trim_end_matches('.').to_owned(), txt.clone());
            keys.insert(fqdn, txt);
        }
        let resolver = if config.trust == Trust::Dkim {
            Some(MessageAuthenticator::new_system_conf().map_err(|e| {
                anyhow::anyhow!(
                    "trust = \"dkim\" needs the system's DNS resolver configuration \
                     (/etc/resolv.conf): {e}"
                )
            })?)
        } else {
            None
        };
        Ok(Checker {
            trust: config.trust,
            authserv_id: config.authserv_id.clone(),
            keys: StaticKeys(keys),
            resolver,
        })
    }

    /// The verdict on `mail`'s sender.
    pub async fn check(&self, mail: &IncomingMail) -> Verdict {
        let Some(from) = &mail.from else {
            return Verdict::Untrusted("the message has no From address".into());
        };
        let Some((_, from_domain)) = from.address.rsplit_once('@') else {
            return Verdict::Untrusted(format!("From {:?} has no domain", from.address));
        };
        match self.trust {
            Trust::Allowlist => Verdict::Trusted("allowlist only".into()),
            Trust::AuthenticationResults => {
                let id = self.authserv_id.as_deref().unwrap_or_default();
                authentication_results(mail.headers(), id, from_domain)
            }
            Trust::Dkim => self.dkim(mail.raw(), from_domain).await,
        }
    }

    async fn dkim(&self, raw: &[u8], from_domain: &str) -> Verdict {
        let Some(resolver) = &self.resolver else {
            return Verdict::Unknown("no DNS resolver".into());
        };
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            return Verdict::Untrusted("the message cannot be parsed for DKIM".into());
        };
        let params = mail_auth::Parameters::new(&message).with_txt_cache(&self.keys);
        let outputs = resolver.verify_dkim(params).await;
        if outputs.is_empty() {
            return Verdict::Untrusted("no DKIM signature".into());
        }
        let mut reasons = Vec::new();
        let mut temporary = None;
        for out in &outputs {
            let Some(sig) = out.signature() else {
                reasons.push(format!(
                    "unusable DKIM signature ({})",
                    describe(out.result())
                ));
                continue;
            };
            match out.result() {
                DkimResult::Pass if sig.l > 0 => reasons.push(format!(
                    "DKIM signature of {} covers only part of the body (l=)",
                    sig.d
                )),
                DkimResult::Pass if !aligned(&sig.d, from_domain) => reasons.push(format!(
                    "DKIM signature of {} is not aligned with From domain {from_domain}",
                    sig.d
                )),
                DkimResult::Pass => {
                    return Verdict::Trusted(format!("dkim=pass d={} s={}", sig.d, sig.s));
                }
                DkimResult::TempError(e) => {
                    temporary = Some(format!("DKIM key of {} not available now: {e}", sig.d));
                }
                other => reasons.push(format!("DKIM signature of {}: {}", sig.d, describe(other))),
            }
        }
        if let Some(t) = temporary {
            return Verdict::Unknown(t);
        }
        Verdict::Untrusted(reasons.join("; "))
    }
}

fn describe(r: &DkimResult) -> String {
    match r {
        DkimResult::Pass => "pass".into(),
        DkimResult::Neutral(e) => format!("neutral ({e})"),
        DkimResult::Fail(e) => format!("fail ({e})"),
        DkimResult::PermError(e) => format!("permerror ({e})"),
        DkimResult::TempError(e) => format!("temperror ({e})"),
        DkimResult::None => "none".into(),
    }
}

/// The `authentication-results` verdict from `headers` (top first).
pub fn authentication_results(
    headers: &[(String, String)],
    authserv_id: &str,
    from_domain: &str,
) -> Verdict {
    let Some(value) = headers.iter().find_map(|(n, v)| {
        (n.eq_ignore_ascii_case("Authentication-Results")
            && parse_results(v).0.eq_ignore_ascii_case(authserv_id))
        .then_some(v)
    }) else {
        return Verdict::Untrusted(format!(
            "no Authentication-Results header from {authserv_id}"
        ));
    };
    let (_, methods) = parse_results(value);
    for m in &methods {
        if m.method == "dmarc" && m.result == "pass" {
            return Verdict::Trusted(format!("{authserv_id}: dmarc=pass"));
        }
    }
    for m in &methods {
        if m.method == "dkim" && m.result == "pass" {
            let d = m.prop("header.d").or_else(|| {
                m.prop("header.i")
                    .map(|i| i.rsplit('@').next().unwrap_or(i))
            });
            if let Some(d) = d
                && aligned(d, from_domain)
            {
                return Verdict::Trusted(format!("{authserv_id}: dkim=pass header.d={d}"));
            }
        }
    }
    let seen: Vec<String> = methods
        .iter()
        .map(|m| format!("{}={}", m.method, m.result))
        .collect();
    Verdict::Untrusted(format!(
        "{authserv_id} reports {} (needs dmarc=pass or an aligned dkim=pass)",
        if seen.is_empty() {
            "no result".to_owned()
        } else {
            seen.join(", ")
        }
    ))
}

/// One `method=result prop=value…` of an Authentication-Results header.
#[derive(Debug)]
struct Finding {
    method: String,
    result: String,
    props: Vec<(String, String)>,
}

impl Finding {
    fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The authserv-id and the methods of an Authentication-Results value (RFC 8601),
/// comments removed.
fn parse_results(value: &str) -> (String, Vec<Finding>) {
    let mut clean = String::with_capacity(value.len());
    let mut depth = 0u32;
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' if depth == 0 => {
                quoted = !quoted;
                clean.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => clean.push(c),
            _ => {}
        }
    }
    let mut parts = clean.split(';');
    let id = parts
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let methods = parts
        .filter_map(|p| {
            let mut words = p.split_whitespace();
            let (method, result) = words.next()?.split_once('=')?;
            let props = words
                .filter_map(|w| {
                    let (k, v) = w.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Finding {
                method: method.to_ascii_lowercase(),
                result: result.to_ascii_lowercase(),
                props,
            })
        })
        .collect();
    (id, methods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(values: &[&str]) -> Vec<(String, String)> {
        values
            .iter()
            .map(|v| ("Authentication-Results".to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn allowlist_is_exact_or_whole_domain() {
        let allow = vec!["alice@lab.org".to_owned(), "@core.lab.org".to_owned()];
        assert!(allowed(&allow, "Alice@Lab.org"));
        assert!(allowed(&allow, "bob@core.lab.org"));
        assert!(!allowed(&allow, "alice@lab.org.evil.com"));
        assert!(!allowed(&allow, "xalice@lab.org"));
        assert!(!allowed(&allow, "bob@evilcore.lab.org"));
        assert!(!allowed(&allow, "bob@x.core.lab.org"));
    }

    #[test]
    fn alignment_is_relaxed_but_not_to_a_bare_suffix() {
        assert!(aligned("lab.org", "lab.org"));
        assert!(aligned("lab.org", "mail.lab.org"));
        assert!(!aligned("org", "lab.org"));
        assert!(!aligned("evil.org", "lab.org"));
        assert!(!aligned("mail.lab.org", "lab.org"));
        assert!(!aligned("", "lab.org"));
    }

    #[test]
    fn only_our_mta_header_counts() {
        let ours = "mx.lab.org";
        // A forged header below ours does not help a failing sender.
        let v = authentication_results(
            &h(&[
                "mx.lab.org; dkim=fail header.d=lab.org; dmarc=fail header.from=lab.org",
                "mx.lab.org; dmarc=pass header.from=lab.org",
            ]),
            ours,
            "lab.org",
        );
        assert!(matches!(v, Verdict::Untrusted(_)), "{v:?}");
        // Another host's pass is not ours.
        let v = authentication_results(&h(&["evil.example; dmarc=pass"]), ours, "lab.org");
        assert!(matches!(v, Verdict::Untrusted(_)), "{v:?}");
        let v = authentication_results(
            &h(&[
                "mx.lab.org 1; spf=pass (comment; with = signs) smtp.mailfrom=lab.org; dmarc=pass (p=reject) header.from=lab.org",
            ]),
            ours,
            "lab.org",
        );
        assert!(matches!(v, Verdict::Trusted(_)), "{v:?}");
        let v = authentication_results(
            &h(&["mx.lab.org; dkim=pass header.d=lab.org header.s=s1"]),
            ours,
            "mail.lab.org",
        );
        assert!(matches!(v, Verdict::Trusted(_)), "{v:?}");
        let v = authentication_results(
            &h(&["mx.lab.org; dkim=pass header.d=other.org; spf=pass"]),
            ours,
            "lab.org",
        );
        assert!(
            matches!(&v, Verdict::Untrusted(r) if r.contains("dkim=pass, spf=pass")),
            "{v:?}"
        );
    }
}
