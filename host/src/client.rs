//! The CLI's side of the admin API: finds a running host and calls it.
//!
//! A host writes its admin address to `.wasmproc/admin.addr` beside its
//! formation; `--admin ADDR` overrides that.

use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// The admin address of the host running `formation`, or `explicit`.
pub fn admin_address(explicit: Option<&str>, formation: &Path) -> anyhow::Result<String> {
    if let Some(addr) = explicit {
        return Ok(addr
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string());
    }
    let dir = formation
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = dir.join(".wasmproc").join("admin.addr");
    std::fs::read_to_string(&file)
        .map(|s| s.trim().to_string())
        .with_context(|| {
            format!(
                "no running host found for `{}` (cannot read `{}`); start one with `wasmproc run`, or pass `--admin ADDR`",
                formation.display(),
                file.display()
            )
        })
}

/// Sends one request to the admin API at `addr`; returns status and body.
pub async fn call(
    addr: &str,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
    content_type: Option<&str>,
) -> anyhow::Result<(http::StatusCode, String)> {
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
    if let Some(ct) = content_type {
        request = request.header(http::header::CONTENT_TYPE, ct);
    }
    if let Ok(token) = std::env::var(crate::formation::DEFAULT_TOKEN_ENV)
        && !token.trim().is_empty()
    {
        request = request.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The `error` field of an admin error body, or the body itself.
pub fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(String::from))
        .unwrap_or_else(|| body.trim().to_string())
}

/// Fails with the admin API's message unless `status` is a success.
pub fn check(status: http::StatusCode, body: &str) -> anyhow::Result<()> {
    if status.is_success() {
        Ok(())
    } else {
        bail!("{}", error_text(body))
    }
}
