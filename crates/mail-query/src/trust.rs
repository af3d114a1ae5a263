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
        // Which From a signature or our MTA vouched for must not be a question.
        if let Some(why) = several_senders(mail.headers()) {
            return Verdict::Untrusted(why);
        }
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

/// Why a message names more than one sender: several From headers, or several
/// addresses in one (`@` outside quoted strings).
fn several_senders(headers: &[(String, String)]) -> Option<String> {
    let froms: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("From"))
        .map(|(_, v)| v.as_str())
        .collect();
    if froms.len() > 1 {
        return Some(format!("the message has {} From headers", froms.len()));
    }
    let value = froms.first()?;
    let mut quoted = false;
    let mut ats = 0;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                chars.next();
            }
            '"' => quoted = !quoted,
            '@' if !quoted => ats += 1,
            _ => {}
        }
    }
    (ats > 1).then(|| "the From header names more than one address".to_owned())
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
        // DMARC's verdict is about the From domain it names: it must be ours.
        if m.method == "dmarc"
            && m.result == "pass"
            && m.prop("header.from")
                .is_some_and(|d| d.trim_end_matches('.').eq_ignore_ascii_case(from_domain))
        {
            return Verdict::Trusted(format!(
                "{authserv_id}: dmarc=pass header.from={from_domain}"
            ));
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

/// The authserv-id and the methods of an Authentication-Results value (RFC 8601):
/// comments (nested, with `\` escapes) removed; a quoted string (with `\` escapes) is
/// one piece of its token, so a `;` or `=` inside it (a quoted `smtp.mailfrom` the
/// sender chose) never starts another result.
fn parse_results(value: &str) -> (String, Vec<Finding>) {
    let mut segments: Vec<Vec<String>> = vec![Vec::new()];
    let mut token = String::new();
    let mut depth = 0u32;
    let mut quoted = false;
    let mut chars = value.chars();
    let flush = |token: &mut String, segments: &mut Vec<Vec<String>>| {
        if !token.is_empty()
            && let Some(seg) = segments.last_mut()
        {
            seg.push(std::mem::take(token));
        }
    };
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        token.push(n);
                    }
                }
                '"' => quoted = false,
                _ => token.push(c),
            }
            continue;
        }
        if depth > 0 {
            match c {
                '\\' => {
                    chars.next();
                }
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '(' => depth = 1,
            ';' => {
                flush(&mut token, &mut segments);
                segments.push(Vec::new());
            }
            c if c.is_whitespace() => flush(&mut token, &mut segments),
            _ => token.push(c),
        }
    }
    flush(&mut token, &mut segments);
    let mut segments = segments.into_iter();
    let id = segments
        .next()
        .and_then(|s| s.into_iter().next())
        .unwrap_or_default();
    let methods = segments
        .filter_map(|seg| {
            let mut words = seg.into_iter();
            let first = words.next()?;
            let (method, result) = first.split_once('=')?;
            let props = words
                .filter_map(|w| {
                    let (k, v) = w.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
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
    fn one_sender_only() {
        let from = |v: &str| vec![("From".to_owned(), v.to_owned())];
        assert_eq!(several_senders(&from("Alice <a@lab.org>")), None);
        assert_eq!(several_senders(&from("\"a@b\" <a@lab.org>")), None);
        assert!(several_senders(&from("a@lab.org, b@evil.com")).is_some());
        let mut two = from("a@lab.org");
        two.push(("from".to_owned(), "b@evil.com".to_owned()));
        assert!(several_senders(&two).is_some());
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
        // A quoted value the sender chose cannot add a result of its own.
        let v = authentication_results(
            &h(&[
                "mx.lab.org; spf=pass smtp.mailfrom=\"x; dmarc=pass header.from=lab.org \"@evil.com",
            ]),
            ours,
            "lab.org",
        );
        assert!(matches!(v, Verdict::Untrusted(_)), "{v:?}");
        let v = authentication_results(
            &h(&[
                "mx.lab.org; spf=pass (a \\) comment; dmarc=pass header.from=lab.org) smtp.mailfrom=x",
            ]),
            ours,
            "lab.org",
        );
        assert!(matches!(v, Verdict::Untrusted(_)), "{v:?}");
        // DMARC passed for another From domain.
        let v = authentication_results(
            &h(&["mx.lab.org; dmarc=pass header.from=evil.com"]),
            ours,
            "lab.org",
        );
        assert!(matches!(v, Verdict::Untrusted(_)), "{v:?}");
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
