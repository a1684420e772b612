//! Who may drive the admin API: the operator's CLI and tools, and the
//! operator's browser on the dashboard — never a guest, and never another
//! web page in the operator's browser.
//!
//! Invariants (every route but the probes `/healthz` and `/readyz`):
//! - on a loopback listener the `Host` must be an IP address or
//!   `localhost`: a DNS-rebinding page's requests name its own domain;
//! - a request with a bearer token must carry one the host accepts: the
//!   one it generated at start (32 random bytes, written `0600` to
//!   `.wasmproc/admin.token` beside `admin.addr`, where the CLI reads it),
//!   or the operator's token from `[admin] token_env`; tokens are compared
//!   in constant time, after trimming white space on both sides the same
//!   way. Such a request is refused when a browser sent it for a page (an
//!   `Origin` header, or a `Sec-Fetch-Site` other than `none`);
//! - the dashboard's requests carry no token but a session instead, in an
//!   `X-Wasmproc-Session` header (the event stream, which a browser opens
//!   without headers, in `?session=`). A session is made only by a
//!   one-time login code (16 random bytes, for 15 minutes, used once) that
//!   the host gives the CLI (`wasmproc ui`, with the per-start token), and
//!   it lives in the dashboard page's own storage, which no page of
//!   another origin can read — not a cookie, which the browser would also
//!   send to every other port of the host, where a local process could
//!   catch it. It is accepted only from the dashboard's own origin as
//!   well: `Sec-Fetch-Site`, when present, `same-origin` (or `none` on
//!   `GET`), and an `Origin` equal to the admin API's own — required on
//!   every other method.
//!
//! A per-start token in a file also means a stale `admin.addr` (the host
//! died, another process took the port) only ever receives the dead
//! host's token, never a secret meant for another process.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, header};
use subtle::ConstantTimeEq as _;

/// The header carrying a dashboard session.
pub const SESSION_HEADER: &str = "x-wasmproc-session";
/// How long a login code may wait to be used.
const CODE_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How long a dashboard session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// Login codes waiting at once; the oldest goes first.
const MAX_CODES: usize = 16;
/// Dashboard sessions at once; the oldest goes first.
const MAX_SESSIONS: usize = 32;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or a wrong one: 401.
    Token,
    /// A browser sent it for a web page: 403.
    Browser,
    /// The `Host` names a domain on a loopback listener: 403.
    Host,
    /// A dashboard session's request did not come from the dashboard: 403.
    Origin,
}

/// Who a request that passed [`Keys::check`] comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A bearer token's holder: the CLI, a script.
    Operator,
    /// The dashboard, in the operator's browser, with its session.
    Dashboard(Session),
}

/// A live dashboard session's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session(String);

impl Refusal {
    /// What the refusal's error says.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Token => "missing or wrong bearer token",
            Refusal::Browser => "requests from web pages are refused",
            Refusal::Host => "the Host header must be the admin API's IP address or localhost",
            Refusal::Origin => "a dashboard request must come from the dashboard itself",
        }
    }
}

/// The tokens the admin API accepts, and the dashboard's sessions.
pub struct Keys {
    per_start: String,
    operator: Option<String>,
    /// Login codes not yet used, with when they expire.
    codes: Mutex<Vec<(String, Instant)>>,
    /// Dashboard sessions, with when they expire.
    sessions: Mutex<Vec<(String, Instant)>>,
}

/// `n` random bytes, in hex.
fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot generate a secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Takes `given` out of `entries` if it is there and has not expired,
/// comparing every live entry in constant time; drops expired ones.
fn take(entries: &Mutex<Vec<(String, Instant)>>, given: &str, consume: bool) -> bool {
    let now = Instant::now();
    let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
    entries.retain(|(_, expires)| *expires > now);
    let mut found = None;
    for (i, (secret, _)) in entries.iter().enumerate() {
        if bool::from(secret.as_bytes().ct_eq(given.as_bytes())) {
            found = Some(i);
        }
    }
    match found {
        Some(i) => {
            if consume {
                entries.remove(i);
            }
            true
        }
        None => false,
    }
}

/// Adds a fresh secret of `n` bytes to `entries`, valid for `lifetime`.
fn add(
    entries: &Mutex<Vec<(String, Instant)>>,
    n: usize,
    lifetime: Duration,
    max: usize,
) -> anyhow::Result<String> {
    let secret = random_hex(n)?;
    let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    entries.retain(|(_, expires)| *expires > now);
    if entries.len() >= max {
        entries.remove(0);
    }
    entries.push((secret.clone(), now + lifetime));
    Ok(secret)
}

impl Keys {
    /// A fresh per-start token, and `operator`'s if the formation names one.
    pub fn generate(operator: Option<&str>) -> anyhow::Result<Keys> {
        Ok(Keys {
            per_start: random_hex(32)?,
            operator: operator.map(|t| t.trim().to_string()),
            codes: Mutex::default(),
            sessions: Mutex::default(),
        })
    }

    /// A fresh one-time login code for the dashboard.
    pub fn login_code(&self) -> anyhow::Result<String> {
        add(&self.codes, 16, CODE_LIFETIME, MAX_CODES)
    }

    /// Uses up `code`: a new session id if it was a live login code.
    pub fn log_in(&self, code: &str) -> anyhow::Result<Option<String>> {
        if !take(&self.codes, code.trim(), true) {
            return Ok(None);
        }
        add(&self.sessions, 32, SESSION_LIFETIME, MAX_SESSIONS).map(Some)
    }

    /// Whether `session` is still live (it expires, or newer ones push it
    /// out, or it logged out).
    pub fn alive(&self, session: &Session) -> bool {
        take(&self.sessions, &session.0, false)
    }

    /// Ends `session`.
    pub fn log_out(&self, session: &Session) {
        take(&self.sessions, &session.0, true);
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
    /// whether the listener is on a loopback address; `query_session` is a
    /// session given in the query string (the event stream's way).
    pub fn check(
        &self,
        method: &Method,
        headers: &HeaderMap,
        query_session: Option<&str>,
        loopback: bool,
    ) -> Result<Caller, Refusal> {
        if !local_request(headers, loopback) {
            return Err(Refusal::Host);
        }
        let host = headers.get(header::HOST);
        let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
        let origin = headers.get(header::ORIGIN);
        if let Some(given) = headers.get(header::AUTHORIZATION) {
            if origin.is_some() || site.is_some_and(|site| site != b"none") {
                return Err(Refusal::Browser);
            }
            let given = given.to_str().ok().and_then(|v| v.strip_prefix("Bearer "));
            return match given {
                Some(given) if self.accepts(given) => Ok(Caller::Operator),
                _ => Err(Refusal::Token),
            };
        }
        let own = |origin: &http::HeaderValue| {
            host.is_some_and(|host| {
                origin.as_bytes().strip_prefix(b"http://") == Some(host.as_bytes())
            })
        };
        let given = headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .or(query_session);
        let session = given.filter(|given| take(&self.sessions, given, false));
        let Some(session) = session else {
            // Another site's page gets told so; anyone else needs a token.
            let foreign = origin.is_some_and(|o| !own(o))
                || site.is_some_and(|site| site != b"none" && site != b"same-origin");
            return Err(if foreign {
                Refusal::Browser
            } else {
                Refusal::Token
            });
        };
        let reading = matches!(*method, Method::GET | Method::HEAD);
        let site_ok = match site {
            None | Some(b"same-origin") => true,
            Some(b"none") => reading,
            Some(_) => false,
        };
        let origin_ok = match origin {
            Some(origin) => own(origin),
            None => reading,
        };
        if site_ok && origin_ok {
            Ok(Caller::Dashboard(Session(session.to_string())))
        } else {
            Err(Refusal::Origin)
        }
    }
}

/// Whether a request may be for this listener: on loopback, its `Host`
/// must be an IP address or `localhost`.
pub fn local_request(headers: &HeaderMap, loopback: bool) -> bool {
    !loopback
        || headers
            .get(header::HOST)
            .is_some_and(|h| local_host(h.as_bytes()))
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
        let ok =
            |pairs: &[(&'static str, &str)]| keys.check(&Method::POST, &headers(pairs), None, true);
        assert_eq!(ok(&[("host", "127.0.0.1:9")]), Err(Refusal::Token));
        assert_eq!(
            ok(&[("host", "127.0.0.1:9"), ("authorization", &bearer)]),
            Ok(Caller::Operator)
        );
        assert_eq!(
            ok(&[("host", "localhost:9"), ("authorization", "Bearer s3cret")]),
            Ok(Caller::Operator)
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
                &Method::GET,
                &headers(&[("host", "admin.example"), ("authorization", &bearer)]),
                None,
                false,
            ),
            Ok(Caller::Operator)
        );
    }

    #[test]
    fn a_login_code_makes_one_session_for_the_dashboards_own_requests() {
        let keys = Keys::generate(None).unwrap();
        let code = keys.login_code().unwrap();
        assert_eq!(keys.log_in("not-the-code").unwrap(), None);
        let id = keys.log_in(&code).unwrap().unwrap();
        assert_eq!(keys.log_in(&code).unwrap(), None, "a code works once");
        let dashboard = Ok(Caller::Dashboard(Session(id.clone())));
        let check = |method: Method, pairs: &[(&'static str, &str)]| {
            keys.check(&method, &headers(pairs), None, true)
        };
        let own = [
            ("host", "127.0.0.1:9"),
            (SESSION_HEADER, id.as_str()),
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:9"),
        ];
        assert_eq!(check(Method::POST, &own), dashboard);
        assert_eq!(check(Method::GET, &own[..3]), dashboard);
        // The event stream's session rides in the query.
        assert_eq!(
            keys.check(
                &Method::GET,
                &headers(&[own[0], own[2]]),
                Some(id.as_str()),
                true
            ),
            dashboard
        );
        // A POST needs the dashboard's own Origin.
        assert_eq!(check(Method::POST, &own[..3]), Err(Refusal::Origin));
        let mut other = own;
        other[3] = ("origin", "http://127.0.0.1:8080");
        assert_eq!(check(Method::POST, &other), Err(Refusal::Origin));
        other = own;
        other[2] = ("sec-fetch-site", "same-site");
        assert_eq!(check(Method::POST, &other), Err(Refusal::Origin));
        // A made-up session, and one that logged out.
        assert_eq!(
            check(Method::GET, &[own[0], (SESSION_HEADER, "00")]),
            Err(Refusal::Token)
        );
        let session = Session(id.clone());
        assert!(keys.alive(&session));
        keys.log_out(&session);
        assert!(!keys.alive(&session));
        assert_eq!(check(Method::GET, &own[..3]), Err(Refusal::Token));
    }
}
