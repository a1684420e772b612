//! Who may drive the admin API: the operator's CLI and tools, never a guest
//! and never a web page in the operator's browser.
//!
//! Invariants (every route but the probes `/healthz` and `/readyz`):
//! - a request must carry a bearer token the host accepts: the one it
//!   generated at start (32 random bytes, written `0600` to
//!   `.wasmproc/admin.token` beside `admin.addr`, where the CLI reads it), or
//!   the operator's token from `[admin] token_env`; tokens are compared in
//!   constant time, after trimming white space on both sides the same way;
//! - a request a browser sends on behalf of a page is refused: one with an
//!   `Origin` header, or a `Sec-Fetch-Site` other than `none` (a URL the
//!   operator typed) — so a page can neither drive the API with a simple
//!   form post nor with a DNS-rebinding trick;
//! - on a loopback listener the `Host` must be an IP address or `localhost`:
//!   a rebinding page's requests name its own domain.
//!
//! A per-start token in a file also means a stale `admin.addr` (the host
//! died, another process took the port) only ever receives the dead
//! host's token, never a secret meant for another process.

use std::net::IpAddr;

use http::{HeaderMap, header};
use subtle::ConstantTimeEq as _;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or a wrong one: 401.
    Token,
    /// A browser sent it for a web page: 403.
    Browser,
    /// The `Host` names a domain on a loopback listener: 403.
    Host,
}

impl Refusal {
    /// What the refusal's error says.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Token => "missing or wrong bearer token",
            Refusal::Browser => "requests from web pages are refused",
            Refusal::Host => "the Host header must be the admin API's IP address or localhost",
        }
    }
}

/// The tokens the admin API accepts.
pub struct Keys {
    per_start: String,
    operator: Option<String>,
}

impl Keys {
    /// A fresh per-start token, and `operator`'s if the formation names one.
    pub fn generate(operator: Option<&str>) -> anyhow::Result<Keys> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| anyhow::anyhow!("cannot generate the admin token: {e}"))?;
        let per_start = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Keys {
            per_start,
            operator: operator.map(|t| t.trim().to_string()),
        })
    }

    /// The token generated at start, for the token file.
    pub fn per_start(&self) -> &str {
        &self.per_start
    }

    fn accepts(&self, given: &str) -> bool {
        let given = given.trim().as_bytes();
        let matches = |token: &str| bool::from(token.as_bytes().ct_eq(given));
        // Both compared, whichever matches: no early exit to time.
        let per_start = matches(&self.per_start);
        let operator = self.operator.as_deref().is_some_and(matches);
        per_start | operator
    }

    /// Checks a request to a route that needs authority; `loopback` says
    /// whether the listener is on a loopback address.
    pub fn check(&self, headers: &HeaderMap, loopback: bool) -> Result<(), Refusal> {
        let from_page = headers.contains_key(header::ORIGIN)
            || headers
                .get("sec-fetch-site")
                .is_some_and(|site| site.as_bytes() != b"none");
        if from_page {
            return Err(Refusal::Browser);
        }
        if loopback
            && !headers
                .get(header::HOST)
                .is_some_and(|h| local_host(h.as_bytes()))
        {
            return Err(Refusal::Host);
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if self.accepts(given) => Ok(()),
            _ => Err(Refusal::Token),
        }
    }
}

/// Whether a `Host` header names an IP address or `localhost` (with or
/// without a port).
fn local_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let Ok(authority) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    let name = authority.host();
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn tokens_pages_and_hosts() {
        let keys = Keys::generate(Some(" s3cret \n")).unwrap();
        let bearer = format!("Bearer {}", keys.per_start());
        let ok = |pairs: &[(&'static str, &str)]| keys.check(&headers(pairs), true);
        assert_eq!(ok(&[("host", "127.0.0.1:9")]), Err(Refusal::Token));
        assert_eq!(
            ok(&[("host", "127.0.0.1:9"), ("authorization", &bearer)]),
            Ok(())
        );
        assert_eq!(
            ok(&[("host", "localhost:9"), ("authorization", "Bearer s3cret")]),
            Ok(())
        );
        assert_eq!(
            ok(&[("host", "[::1]:9"), ("authorization", "Bearer wrong")]),
            Err(Refusal::Token)
        );
        // A form post from a page, and a rebinding page's request.
        assert_eq!(
            ok(&[
                ("host", "127.0.0.1:9"),
                ("origin", "http://evil.example"),
                ("authorization", &bearer)
            ]),
            Err(Refusal::Browser)
        );
        assert_eq!(
            ok(&[("host", "evil.example:9"), ("authorization", &bearer)]),
            Err(Refusal::Host)
        );
        assert_eq!(
            ok(&[
                ("host", "127.0.0.1:9"),
                ("sec-fetch-site", "cross-site"),
                ("authorization", &bearer)
            ]),
            Err(Refusal::Browser)
        );
        // Off loopback the host is not checked (a token is required there).
        assert_eq!(
            keys.check(
                &headers(&[("host", "admin.example"), ("authorization", &bearer)]),
                false
            ),
            Ok(())
        );
    }
}
