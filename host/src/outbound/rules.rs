//! `allow_outbound` rules: what each entry means, parsed once per process
//! type, and which requests a rule lets through.
//!
//! A rule has a host part and an optional port part:
//!
//! | host part | matches |
//! |---|---|
//! | `api.example.com` | that name only |
//! | `*.example.com` | any name under `example.com`, at any depth, but not `example.com` itself |
//! | `10.0.0.5`, `[::1]` | that address only, written as an address in the request |
//! | `*` | any host |
//!
//! | port part | matches |
//! |---|---|
//! | none | the scheme's default port: 80 for `http`, 443 for `https` |
//! | `:8080` | that port only |
//! | `:*` | any port |
//!
//! So `*` alone is any host on the default ports, and `*:*` any host on any
//! port. A rule only says which *names* a guest may ask for; where a name
//! leads is checked after resolution (see [`super::address`]): only a rule
//! that is an IP literal may reach a non-public address, and then only that
//! address, written as such in the request.
//!
//! Invariants: a [`Rule`] is only built by [`parse_rule`], so its name is a
//! lowercase DNS name without a trailing dot, its port is never 0, and an
//! IPv6 literal with a port was bracketed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU16;

/// One `allow_outbound` entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    port: PortPattern,
}

/// The host part of a [`Rule`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host (whose addresses are public).
    Any,
    /// `api.example.com`: that name.
    Name(String),
    /// `*.example.com`, kept as `example.com`: any name below it.
    Subdomains(String),
    /// `10.0.0.5` or `[::1]`: that address, the only form that may reach a
    /// non-public address.
    Ip(IpAddr),
}

/// The port part of a [`Rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortPattern {
    /// No port written: the scheme's default port.
    Default,
    /// `:8080`.
    Exact(NonZeroU16),
    /// `:*`.
    Any,
}

/// The host a request names, decoded from its authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
    /// An IP literal (`10.0.0.5`, `[::1]` in the URL).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
        }
    }
}

/// Where a request goes: decoded from its URI, before any rule is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host it names.
    pub host: Host,
    /// The port: the URI's, or the scheme's default.
    pub port: u16,
    /// Whether the scheme is `https`.
    pub tls: bool,
}

/// Why a URI cannot be a [`Target`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadUri {
    /// Neither `http` nor `https`.
    #[error("the scheme is not `http` or `https`")]
    Scheme,
    /// No authority, or one without a usable host or port.
    #[error("the URI has no valid host and port")]
    Authority,
}

impl Target {
    /// The target of a request to `uri`.
    pub fn from_uri(uri: &http::Uri) -> Result<Target, BadUri> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(BadUri::Scheme),
        };
        let authority = uri.authority().ok_or(BadUri::Authority)?;
        let host = request_host(authority.host()).ok_or(BadUri::Authority)?;
        let port = match authority.port_u16() {
            Some(0) => return Err(BadUri::Authority),
            Some(port) => port,
            None => default_port(tls),
        };
        Ok(Target { host, port, tls })
    }

    /// The scheme's default port.
    pub fn default_port(&self) -> u16 {
        default_port(self.tls)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn default_port(tls: bool) -> u16 {
    if tls { 443 } else { 80 }
}

/// The host of a request's authority (`http::uri::Authority::host`, which
/// keeps IPv6 brackets and drops any `user@`).
fn request_host(host: &str) -> Option<Host> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        return inner.parse::<Ipv6Addr>().ok().map(|ip| Host::Ip(ip.into()));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some(Host::Ip(ip.into()));
    }
    let name = host.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    (!name.is_empty()).then(|| Host::Name(name.to_string()))
}

impl Rule {
    /// Whether this rule lets a request go to `target`.
    pub fn matches(&self, target: &Target) -> bool {
        self.matches_host(&target.host) && self.matches_port(target)
    }

    /// Whether the host part alone matches (for telling a user that only
    /// the port was wrong).
    pub fn matches_host(&self, host: &Host) -> bool {
        match (&self.host, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Name(rule), Host::Name(name)) => rule == name,
            (HostPattern::Subdomains(domain), Host::Name(name)) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::Ip(rule), Host::Ip(ip)) => rule == ip,
            (HostPattern::Name(_) | HostPattern::Subdomains(_), Host::Ip(_))
            | (HostPattern::Ip(_), Host::Name(_)) => false,
        }
    }

    fn matches_port(&self, target: &Target) -> bool {
        match self.port {
            PortPattern::Default => target.port == target.default_port(),
            PortPattern::Exact(port) => target.port == port.get(),
            PortPattern::Any => true,
        }
    }

    /// The host part.
    pub fn host(&self) -> &HostPattern {
        &self.host
    }

    /// The port part.
    pub fn port(&self) -> PortPattern {
        self.port
    }

    /// Whether this rule names `ip` itself, so the operator has vouched
    /// for that address even if it is not public.
    pub fn names_address(&self, ip: IpAddr) -> bool {
        self.host == HostPattern::Ip(ip)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Any => f.write_str("*")?,
            HostPattern::Name(name) => f.write_str(name)?,
            HostPattern::Subdomains(domain) => write!(f, "*.{domain}")?,
            HostPattern::Ip(IpAddr::V4(ip)) => write!(f, "{ip}")?,
            HostPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
        }
        match self.port {
            PortPattern::Default => Ok(()),
            PortPattern::Exact(port) => write!(f, ":{port}"),
            PortPattern::Any => f.write_str(":*"),
        }
    }
}

/// Parses one `allow_outbound` entry (see the module docs for the forms).
/// Case does not matter. The error says what is wrong and what was
/// expected, without repeating the entry, so the formation can place it
/// after "invalid outbound rule `…`: ".
pub fn parse_rule(text: &str) -> Result<Rule, String> {
    let text = text.trim().to_ascii_lowercase();
    if text.is_empty() {
        return Err("expected `host`, `host:port`, `host:*`, `*.domain` or `*`".to_string());
    }
    let (host, port) = split_host_port(&text)?;
    let port = match port {
        None => PortPattern::Default,
        Some("*") => PortPattern::Any,
        Some(port) => match port.parse::<NonZeroU16>() {
            // `u16::from_str` takes a leading `+`: a port is digits only.
            Ok(port_number) if port.bytes().all(|b| b.is_ascii_digit()) => {
                PortPattern::Exact(port_number)
            }
            _ => {
                return Err(format!(
                    "`{port}` is not a port: expected a number from 1 to 65535, or `*`"
                ));
            }
        },
    };
    Ok(Rule {
        host: host_pattern(host)?,
        port,
    })
}

/// Splits `host[:port]`, where an IPv6 host with a port is bracketed and
/// a bare IPv6 address (`::1`) has no port.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err("`[` without `]`: expected `[IPv6]` or `[IPv6]:port`".to_string());
        };
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| {
                format!("unexpected `{after}` after `]`: expected `:port` or `:*`")
            })?),
        };
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(format!("`{inside}` is not an IPv6 address"));
        }
        return Ok((&text[..inside.len() + 2], port));
    }
    if text.parse::<Ipv6Addr>().is_ok() {
        return Ok((text, None));
    }
    match text.split_once(':') {
        None => Ok((text, None)),
        Some((host, port)) if !port.contains(':') => Ok((host, Some(port))),
        Some(_) => {
            Err("too many `:`: an IPv6 address with a port is written `[IPv6]:port`".to_string())
        }
    }
}

fn host_pattern(host: &str) -> Result<HostPattern, String> {
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some(inside) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inside
            .parse::<Ipv6Addr>()
            .map(|ip| HostPattern::Ip(ip.into()))
            .map_err(|_| format!("`{inside}` is not an IPv6 address"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(HostPattern::Ip(ip));
    }
    if let Some(domain) = host.strip_prefix("*.") {
        let domain = dns_name(domain)?;
        return Ok(HostPattern::Subdomains(domain));
    }
    if host.contains('*') {
        return Err(format!(
            "`{host}`: `*` may only stand alone or as the first label (`*.example.com`)"
        ));
    }
    dns_name(host).map(HostPattern::Name)
}

/// A valid DNS name, without its trailing dot.
fn dns_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let expected = "expected a DNS name (letters, digits, `-`, `_` and dots), an IP address or `*`";
    if name.is_empty() || name.len() > 253 {
        return Err(format!("`{name}` is not a host name: {expected}"));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!("`{name}` is not a host name: {expected}"));
        }
    }
    // `10.1` or `2130706433` are not names, and resolvers read them as
    // addresses: ask for the address written in full.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "`{name}` is neither a host name nor an IP address: write addresses in full, like `10.0.0.5`"
        ));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        parse_rule(text).unwrap_or_else(|e| panic!("`{text}`: {e}"))
    }

    fn target(url: &str) -> Target {
        Target::from_uri(&url.parse().unwrap()).unwrap()
    }

    fn allows(rule_text: &str, url: &str) -> bool {
        rule(rule_text).matches(&target(url))
    }

    #[test]
    fn a_host_alone_allows_only_the_default_port_of_the_scheme() {
        assert!(allows("api.example.com", "https://api.example.com/x"));
        assert!(allows("api.example.com", "http://api.example.com/x"));
        assert!(allows("api.example.com", "https://api.example.com:443/"));
        assert!(!allows("api.example.com", "https://api.example.com:8443/"));
        assert!(!allows("api.example.com", "http://api.example.com:443/"));
        assert!(!allows("127.0.0.1", "http://127.0.0.1:9000/"));
        assert!(allows("127.0.0.1", "http://127.0.0.1/"));
    }

    #[test]
    fn a_port_allows_that_port_and_star_any_port() {
        assert!(allows(
            "api.example.com:8443",
            "https://api.example.com:8443/"
        ));
        assert!(!allows("api.example.com:8443", "https://api.example.com/"));
        assert!(allows("api.example.com:*", "http://api.example.com:1/"));
        assert!(allows("api.example.com:*", "https://api.example.com/"));
        assert!(allows("127.0.0.1:9000", "http://127.0.0.1:9000/"));
        assert!(!allows("127.0.0.1:9000", "http://127.0.0.1:9001/"));
    }

    #[test]
    fn names_match_whole_and_without_case_or_trailing_dot() {
        assert!(allows("api.example.com", "https://API.Example.COM/"));
        assert!(allows("api.example.com", "https://api.example.com./"));
        assert!(allows("API.example.com", "https://api.example.com/"));
        assert!(!allows("api.example.com", "https://evil-api.example.com/"));
        assert!(!allows(
            "api.example.com",
            "https://api.example.com.evil.net/"
        ));
        assert!(!allows("example.com", "https://api.example.com/"));
        // `user@` is not part of the host.
        assert!(!allows("allowed.com", "https://allowed.com@evil.net/"));
        assert!(allows("evil.net", "https://allowed.com@evil.net/"));
    }

    #[test]
    fn a_wildcard_label_allows_subdomains_but_not_the_domain() {
        assert!(allows("*.example.com", "https://api.example.com/"));
        assert!(allows("*.example.com", "https://a.b.example.com/"));
        assert!(!allows("*.example.com", "https://example.com/"));
        assert!(!allows("*.example.com", "https://badexample.com/"));
        assert!(!allows("*.example.com", "https://api.example.com:8443/"));
        assert!(allows(
            "*.example.com:8443",
            "https://api.example.com:8443/"
        ));
        assert!(allows("*.example.com:*", "http://api.example.com:1234/"));
        assert!(!allows("*.example.com", "http://10.0.0.1/"));
    }

    #[test]
    fn star_is_any_host_on_the_default_ports_and_star_star_any_port() {
        assert!(allows("*", "https://anything.net/"));
        assert!(allows("*", "http://10.0.0.1/"));
        assert!(!allows("*", "http://anything.net:8080/"));
        assert!(allows("*:*", "http://anything.net:8080/"));
        assert!(allows("*:8080", "http://anything.net:8080/"));
    }

    #[test]
    fn ip_literals_match_only_that_address_written_as_an_address() {
        assert!(allows("10.0.0.5", "http://10.0.0.5/"));
        assert!(!allows("10.0.0.5", "http://10.0.0.6/"));
        assert!(allows("[::1]:8080", "http://[::1]:8080/"));
        assert!(allows("[::1]:8080", "http://[0:0::1]:8080/"));
        assert!(!allows("[::1]:8080", "http://[::1]:8081/"));
        assert!(!allows("[::1]:8080", "http://127.0.0.1:8080/"));
        assert!(allows("::1", "http://[::1]/"));
        assert!(allows("[2001:db8::1]:*", "https://[2001:db8::1]:99/"));
        // A mapped address is another spelling: it does not match.
        assert!(!allows("10.0.0.5", "http://[::ffff:10.0.0.5]/"));
        // A name never matches an address rule, whatever it resolves to.
        assert!(!allows("127.0.0.1:8080", "http://localhost:8080/"));
    }

    #[test]
    fn rules_parse_into_their_parts_and_print_back() {
        for (text, shown) in [
            ("api.example.com", "api.example.com"),
            ("API.Example.com:8443", "api.example.com:8443"),
            ("api.example.com.", "api.example.com"),
            ("*.example.com:*", "*.example.com:*"),
            ("*", "*"),
            ("*:*", "*:*"),
            ("10.0.0.5:8080", "10.0.0.5:8080"),
            ("[::1]:8080", "[::1]:8080"),
            ("[::1]", "[::1]"),
            ("::1", "[::1]"),
            ("fe80::1", "[fe80::1]"),
            ("my_service.internal", "my_service.internal"),
        ] {
            assert_eq!(rule(text).to_string(), shown, "{text}");
        }
        assert_eq!(
            rule("[::1]:80").host(),
            &HostPattern::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            rule("h.com:8080").port(),
            PortPattern::Exact(NonZeroU16::new(8080).unwrap())
        );
    }

    #[test]
    fn invalid_rules_say_what_was_expected() {
        for (text, expected) in [
            ("", "expected `host`"),
            ("h.com:", "`` is not a port"),
            ("h.com:0", "`0` is not a port"),
            ("h.com:65536", "`65536` is not a port"),
            ("h.com:http", "`http` is not a port"),
            ("h.com:+80", "`+80` is not a port"),
            ("h.com:80:80", "too many `:`"),
            ("::1:80x", "too many `:`"),
            ("[::1", "`[` without `]`"),
            ("[::1]80", "unexpected `80` after `]`"),
            ("[10.0.0.1]:80", "not an IPv6 address"),
            ("*.*.example.com", "not a host name"),
            ("api.*.com", "`*` may only stand alone"),
            ("*example.com", "`*` may only stand alone"),
            ("-bad.com", "not a host name"),
            ("a..b", "not a host name"),
            ("exa mple.com", "not a host name"),
            ("10.1", "write addresses in full"),
            ("2130706433", "write addresses in full"),
            ("*.", "not a host name"),
        ] {
            let err = parse_rule(text).expect_err(text);
            assert!(err.contains(expected), "`{text}`: {err}");
        }
    }

    #[test]
    fn targets_decode_scheme_host_and_port() {
        let t = target("https://[::1]/x");
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!((t.port, t.tls), (443, true));
        assert_eq!(t.to_string(), "[::1]:443");
        assert_eq!(target("http://a.b:81").to_string(), "a.b:81");
        let bad = |url: &str| Target::from_uri(&url.parse().unwrap()).unwrap_err();
        assert_eq!(bad("ftp://a.b/"), BadUri::Scheme);
        assert_eq!(bad("http://a.b:0/"), BadUri::Authority);
        assert_eq!(bad("/relative"), BadUri::Scheme);
    }
}
