//! The CLI's side of the admin API: finds a running host and calls it
//! through one typed wrapper, [`AdminClient`], whose methods mirror the
//! admin routes and return what they answer, decoded.
//!
//! A host writes its admin address to `.wasmproc/admin.addr` beside its
//! formation and the token it generated at start to `.wasmproc/admin.token`;
//! the client sends that token to that address, and nothing else — so an
//! address file left by a host that died never receives a secret meant for
//! another process. `--admin ADDR` names an address instead; the token is
//! then the operator's, from the variable the formation's `[admin]
//! token_env` names (`WASMPROC_ADMIN_TOKEN` by default). Every path segment
//! and query value the client builds is percent-encoded, so a value such as
//! a delay of `1m 30s` reaches the host as written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;

use crate::control::ProcessStatus;

/// Characters left as they are in a path segment (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What `wasmproc enqueue` may add to a message.
#[derive(Debug, Default)]
pub struct EnqueueOptions<'a> {
    /// The body's media type.
    pub content_type: Option<&'a str>,
    /// Deliver no earlier than this, as the host parses it (`1m 30s`).
    pub delay: Option<&'a str>,
    /// The idempotency key.
    pub key: Option<&'a str>,
}

/// What the host answered an enqueue.
#[derive(Debug, serde::Deserialize)]
pub struct Enqueued {
    /// The message id.
    pub id: String,
    /// True when the key named a message enqueued before (this is its id).
    #[serde(default)]
    pub duplicate: bool,
}

/// A running host's admin API.
pub struct AdminClient {
    addr: String,
    token: Option<String>,
}

impl AdminClient {
    /// The admin API of the host running `formation`, or at `explicit`.
    pub fn find(explicit: Option<&str>, formation: &Path) -> anyhow::Result<AdminClient> {
        if let Some(addr) = explicit {
            let addr = addr.trim_start_matches("http://").trim_end_matches('/');
            let token = std::env::var(token_env(formation))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty());
            return Ok(AdminClient {
                addr: addr.into(),
                token,
            });
        }
        let dir = formation
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(".wasmproc");
        let read = |name: &str| {
            let file = dir.join(name);
            std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "no running host found for `{}` (cannot read `{}`); start one with `wasmproc run`, or pass `--admin ADDR`",
                    formation.display(),
                    file.display()
                )
            })
        };
        let addr = read("admin.addr")?.trim().to_string();
        let token = Some(read("admin.token")?.trim().to_string());
        Ok(AdminClient { addr, token })
    }

    /// `POST /queues/Q/messages`: enqueues `body`, under the idempotency
    /// key `key` if given; returns what the host answered.
    pub async fn enqueue(
        &self,
        queue: &str,
        body: Vec<u8>,
        options: &EnqueueOptions<'_>,
    ) -> anyhow::Result<Enqueued> {
        let mut path = format!("/queues/{}/messages", segment(queue));
        if let Some(delay) = options.delay {
            path.push('?');
            path.push_str(&query(&[("delay", delay)]));
        }
        let mut headers = Vec::new();
        if let Some(ct) = options.content_type {
            headers.push((http::header::CONTENT_TYPE.as_str(), ct));
        }
        if let Some(key) = options.key {
            headers.push(("idempotency-key", key));
        }
        self.call(Method::POST, &path, body, &headers).await
    }

    /// `GET /queues/Q/dead-letters`: the dead letters, as the host wrote them.
    pub async fn dead_letters(&self, queue: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = format!("/queues/{}/dead-letters", segment(queue));
        self.call(Method::GET, &path, Vec::new(), &[]).await
    }

    /// `POST /queues/Q/dead-letters/replay`: moves the dead letters `ids`
    /// (all when empty) back onto the queue; returns how many.
    pub async fn replay(&self, queue: &str, ids: &[String]) -> anyhow::Result<u64> {
        let path = format!(
            "/queues/{}/dead-letters/replay?{}",
            segment(queue),
            query(&[("ids", &ids.join(","))])
        );
        #[derive(serde::Deserialize)]
        struct Replayed {
            replayed: u64,
        }
        let replayed: Replayed = self.call(Method::POST, &path, Vec::new(), &[]).await?;
        Ok(replayed.replayed)
    }

    /// `GET /ps`: the process types.
    pub async fn ps(&self) -> anyhow::Result<Vec<ProcessStatus>> {
        self.call(Method::GET, "/ps", Vec::new(), &[]).await
    }

    /// `POST /ui/link`: a fresh one-time login link to the dashboard.
    pub async fn dashboard_link(&self) -> anyhow::Result<String> {
        #[derive(serde::Deserialize)]
        struct Link {
            url: String,
        }
        let link: Link = self.call(Method::POST, "/ui/link", Vec::new(), &[]).await?;
        Ok(link.url)
    }

    /// `POST /scale`: applies `changes` (`web=3 mailer+1`), all or none;
    /// returns the new scale of each type named.
    pub async fn scale(&self, changes: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
        let body = changes.join(" ").into_bytes();
        self.call(Method::POST, "/scale", body, &[]).await
    }

    /// `POST /deploy/TYPE`: swaps in the component `bytes`; returns its
    /// generation.
    pub async fn deploy(&self, process: &str, bytes: Vec<u8>) -> anyhow::Result<u64> {
        let path = format!("/deploy/{}", segment(process));
        #[derive(serde::Deserialize)]
        struct Deployed {
            generation: u64,
        }
        let deployed: Deployed = self
            .call(
                Method::POST,
                &path,
                bytes,
                &[(http::header::CONTENT_TYPE.as_str(), "application/wasm")],
            )
            .await?;
        Ok(deployed.generation)
    }

    /// `GET /kv/B/K`: the value of `key` in `bucket`, if any.
    pub async fn kv_get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = format!("/kv/{}/{}", segment(bucket), segment(key));
        let (status, body) = self.send(Method::GET, &path, Vec::new(), &[]).await?;
        match status {
            http::StatusCode::OK => Ok(Some(body)),
            http::StatusCode::NOT_FOUND
                if error_text(&String::from_utf8_lossy(&body)).starts_with("no key") =>
            {
                Ok(None)
            }
            _ => bail!("{}", error_text(&String::from_utf8_lossy(&body))),
        }
    }

    /// `PUT /kv/B/K`: sets `key` in `bucket` to `value`.
    pub async fn kv_set(&self, bucket: &str, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        let path = format!("/kv/{}/{}", segment(bucket), segment(key));
        let _: serde_json::Value = self.call(Method::PUT, &path, value, &[]).await?;
        Ok(())
    }

    /// `DELETE /kv/B/K`: removes `key` from `bucket`.
    pub async fn kv_delete(&self, bucket: &str, key: &str) -> anyhow::Result<()> {
        let path = format!("/kv/{}/{}", segment(bucket), segment(key));
        let _: serde_json::Value = self.call(Method::DELETE, &path, Vec::new(), &[]).await?;
        Ok(())
    }

    /// `GET /kv/B`: every key of `bucket`, page after page.
    pub async fn kv_list(&self, bucket: &str) -> anyhow::Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Page {
            keys: Vec<String>,
            cursor: Option<u64>,
        }
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let mut path = format!("/kv/{}", segment(bucket));
            if let Some(cursor) = cursor {
                path.push_str(&format!("?cursor={cursor}"));
            }
            let page: Page = self.call(Method::GET, &path, Vec::new(), &[]).await?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Sends one request with `headers`; fails with the host's message
    /// unless it succeeded; decodes the JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<T> {
        let (status, body) = self.send(method, path, body, headers).await?;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            bail!("{}", error_text(&text));
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the admin API answered `{path}` with unexpected JSON"))
    }

    /// Sends one request; returns the status and the body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(http::StatusCode, Vec<u8>)> {
        let addr = &self.addr;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach the admin API at {addr}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body.to_vec()))
    }
}

/// The variable holding the operator's admin token: the one `formation`'s
/// `[admin] token_env` names, if the file says, else the default.
fn token_env(formation: &Path) -> String {
    std::fs::read_to_string(formation)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| {
            table
                .get("admin")?
                .get("token_env")?
                .as_str()
                .map(String::from)
        })
        .unwrap_or_else(|| crate::formation::DEFAULT_TOKEN_ENV.to_string())
}

/// A path segment, percent-encoded.
fn segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// A query string, percent-encoded.
fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The `error` field of an admin error body, or the body itself.
fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(String::from))
        .unwrap_or_else(|| body.trim().to_string())
}

/// `wasmproc ps`'s table.
pub fn ps_table(rows: &[ProcessStatus]) -> String {
    let mut out = format!(
        "{:<16} {:<7} {:>9} {:>6} {:>6} {:>9} {:>9} {:>8} {:>4}\n",
        "TYPE", "KIND", "SCALE", "BUSY", "IDLE", "UNITS/S", "RESTARTS", "QUEUE", "GEN"
    );
    for r in rows {
        let scale = match (r.min, r.max) {
            (Some(min), Some(max)) => format!("{} ({min}..{max})", r.scale),
            _ => r.scale.to_string(),
        };
        let queue = r
            .queue_depth
            .map_or_else(|| "-".to_string(), |d| d.to_string());
        let _ = writeln!(
            out,
            "{:<16} {:<7} {:>9} {:>6} {:>6} {:>9.1} {:>9} {:>8} {:>4}",
            r.name, r.kind, scale, r.busy, r.idle, r.rate, r.restarts, queue, r.generation
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_queries_are_percent_encoded() {
        assert_eq!(segment("my-web_1"), "my-web_1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(query(&[("delay", "1m 30s")]), "delay=1m+30s");
        assert_eq!(query(&[("ids", "a,b")]), "ids=a%2Cb");
    }
}
