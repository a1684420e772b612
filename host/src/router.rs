//! HTTP routing: which web process type serves a request.
//!
//! Pure and wasm-free, so it is tested on its own. Rules:
//! - a route is an optional host and a path prefix; a prefix matches the path
//!   itself and anything below it on a `/` boundary (`/api` matches `/api`
//!   and `/api/users`, not `/apiary`); `/` matches every path;
//! - routes that name the request's host are tried first (like virtual
//!   hosts: `admin.example.com/` takes the whole host, `/api` included);
//!   routes that name no host are tried only when none of those match;
//! - among the routes tried together, the longest matching prefix wins;
//! - hosts compare case-insensitively, without the port;
//! - no match: the caller answers 404.

use crate::formation::Route;

/// Routes to targets of type `T` (a pool, in the host; anything in tests).
#[derive(Debug)]
pub struct Router<T> {
    /// Sorted so the first match is the best one.
    routes: Vec<(Route, T)>,
}

impl<T> Router<T> {
    /// A router over `routes`.
    pub fn new(mut routes: Vec<(Route, T)>) -> Router<T> {
        routes.sort_by(|(a, _), (b, _)| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then_with(|| b.prefix.len().cmp(&a.prefix.len()))
        });
        Router { routes }
    }

    /// The target for a request to `host` (the `Host` header, port allowed)
    /// and `path`.
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Option<&T> {
        self.matching(host, path).map(|(_, target)| target)
    }

    /// The route that matches a request, with its target.
    pub fn matching(&self, host: Option<&str>, path: &str) -> Option<(&Route, &T)> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .find(|(route, _)| {
                let host_ok = match (&route.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
                host_ok && prefix_matches(&route.prefix, path)
            })
            .map(|(route, target)| (route, target))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: `[::1]:8080`.
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[&str]) -> Router<String> {
        Router::new(
            routes
                .iter()
                .map(|r| (Route::parse(r).unwrap(), r.to_string()))
                .collect(),
        )
    }

    #[test]
    fn the_longest_prefix_wins() {
        let r = router(&["/", "/api", "/api/v2"]);
        assert_eq!(r.resolve(None, "/").unwrap(), "/");
        assert_eq!(r.resolve(None, "/apiary").unwrap(), "/");
        assert_eq!(r.resolve(None, "/api").unwrap(), "/api");
        assert_eq!(r.resolve(None, "/api/users").unwrap(), "/api");
        assert_eq!(r.resolve(None, "/api/v2/x").unwrap(), "/api/v2");
    }

    #[test]
    fn a_host_route_beats_a_hostless_one_and_ignores_the_port() {
        let r = router(&["/", "api.example.com/"]);
        assert_eq!(
            r.resolve(Some("API.example.com:8080"), "/x").unwrap(),
            "api.example.com/"
        );
        assert_eq!(r.resolve(Some("other.example.com"), "/x").unwrap(), "/");
        assert_eq!(r.resolve(None, "/x").unwrap(), "/");
    }

    #[test]
    fn a_host_route_takes_its_whole_host() {
        let r = router(&["/api", "admin.example.com/", "admin.example.com/static"]);
        assert_eq!(
            r.resolve(Some("admin.example.com"), "/api").unwrap(),
            "admin.example.com/"
        );
        assert_eq!(
            r.resolve(Some("admin.example.com"), "/static/a.css")
                .unwrap(),
            "admin.example.com/static"
        );
        assert_eq!(r.resolve(Some("www.example.com"), "/api").unwrap(), "/api");
    }

    #[test]
    fn nothing_matches_without_a_route() {
        let r = router(&["/api", "shop.example.com/"]);
        assert!(r.resolve(Some("example.com"), "/").is_none());
        assert!(r.resolve(Some("[::1]:80"), "/other").is_none());
    }
}
