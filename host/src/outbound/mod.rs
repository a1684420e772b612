//! Outbound HTTP from guests: which requests an instance may send, and how
//! they are sent.
//!
//! Invariants:
//! - a request goes out only to a host the process type lists in
//!   `allow_outbound`; any other gets `HTTP-request-denied` and a log line.

pub mod address;
pub mod rules;

use std::future::Future;
use std::sync::Arc;

use wasmtime_wasi_http::WasiHttpHooks;

use crate::formation::ProcessType;

/// What every instance of one process type shares about outbound requests:
/// the allowed hosts. Created once per pool.
pub struct TypeOutbound {
    allowed: Arc<[String]>,
}

impl TypeOutbound {
    /// The outbound policy of `process`.
    pub fn new(process: &ProcessType) -> TypeOutbound {
        TypeOutbound {
            allowed: process.allow_outbound.clone(),
        }
    }

    /// The policy of one instance of the type.
    pub fn for_instance(&self, instance: &Arc<str>) -> Outbound {
        Outbound {
            instance: instance.clone(),
            allowed: self.allowed.clone(),
        }
    }
}

/// Decides which outbound HTTP requests an instance may send: the
/// `WasiHttpHooks` of its store.
pub struct Outbound {
    instance: Arc<str>,
    allowed: Arc<[String]>,
}

impl Outbound {
    fn allows(&self, authority: &str, default_port: u16) -> bool {
        let authority = authority.to_ascii_lowercase();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h.to_string(), p.parse().unwrap_or(default_port))
            }
            _ => (authority.clone(), default_port),
        };
        self.allowed
            .iter()
            .any(|rule| rule == "*" || *rule == host || *rule == format!("{host}:{port}"))
    }
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let uri = request.uri();
        let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
            443
        } else {
            80
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        if self.allows(&authority, default_port) {
            tracing::debug!(instance = %self.instance, %authority, "outbound request allowed");
            return wasmtime_wasi_http::default_hooks().send_request(request, options, fut);
        }
        tracing::warn!(
            instance = %self.instance,
            %authority,
            "outbound request denied: `{authority}` is not in `allow_outbound`"
        );
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> Outbound {
        Outbound {
            instance: "web.1".into(),
            allowed: rules.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn outbound_rules_match_host_or_host_and_port() {
        let p = policy(&["api.example.com", "127.0.0.1:9000"]);
        assert!(p.allows("api.example.com", 443));
        assert!(p.allows("API.example.com:8443", 443));
        assert!(p.allows("127.0.0.1:9000", 80));
        assert!(!p.allows("127.0.0.1:9001", 80));
        assert!(!p.allows("127.0.0.1", 80));
        assert!(!p.allows("evil.example.com", 443));
        assert!(policy(&["*"]).allows("anything:1", 80));
        assert!(!policy(&[]).allows("api.example.com", 443));
    }
}
