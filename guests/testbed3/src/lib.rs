//! A WASI 0.3 `wasi:http/service` component whose behaviour is chosen by the
//! request path. Its handler is `async`: while one request waits (`/sleep`),
//! the same instance can serve others.
//!
//! | path            | what the guest does                                             |
//! |-----------------|-----------------------------------------------------------------|
//! | `/`             | answers `testbed3 ok`                                           |
//! | `/trap`         | panics (a trap)                                                 |
//! | `/loop`         | spins forever (stopped by the timeout)                          |
//! | `/sleep?ms=N`   | waits N ms without blocking the instance, then answers `slept N` |
//! | `/counter`      | increments a global and answers its value                       |
//! | `/whoami?ms=N`  | waits N ms without blocking the instance, then answers its instance name |
//! | `/echo`         | streams the request body back as it arrives, then trailers `x-echoed: BYTES` |
//! | `/stream?n=N`   | writes N chunks of 1 KiB, yielding between them                 |

use std::sync::atomic::{AtomicU64, Ordering};

use wasip3::http::types::{ErrorCode, Fields, Request, Response, Trailers};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(Testbed3);

struct Testbed3;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.to_string())
    })
}

/// A response with `body`, whole.
fn text(body: String) -> Result<Response, ErrorCode> {
    let (mut tx, rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    let (response, _result) = Response::new(Fields::new(), Some(rx), trailers_rx);
    drop(trailers_tx);
    wit_bindgen::spawn_local(async move {
        let rest = tx.write_all(body.into_bytes()).await;
        assert!(rest.is_empty(), "the client went away");
    });
    Ok(response)
}

impl wasip3::exports::http::handler::Guest for Testbed3 {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let target = request.get_path_with_query().unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        match path {
            "/" => text("testbed3 ok\n".into()),
            "/trap" => panic!("testbed3 was asked to trap"),
            "/loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/sleep" => {
                let ms: u64 = param(query, "ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100);
                wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
                text(format!("slept {ms}\n"))
            }
            "/counter" => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
                text(format!("{n}\n"))
            }
            "/whoami" => {
                let ms: u64 = param(query, "ms").and_then(|v| v.parse().ok()).unwrap_or(0);
                wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
                text(format!(
                    "{}\n",
                    std::env::var("WASMPROC_INSTANCE").unwrap_or_default()
                ))
            }
            "/echo" => {
                let (_, request_result) = wit_future::new(|| Ok(()));
                let (mut body, _request_trailers) = Request::consume_body(request, request_result);
                let (mut tx, rx) = wit_stream::new();
                let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
                // HTTP/1.1 sends only the trailers the head announces.
                let headers = Fields::new();
                headers
                    .append("trailer", b"x-echoed")
                    .expect("valid header");
                let (response, _result) = Response::new(headers, Some(rx), trailers_rx);
                wit_bindgen::spawn_local(async move {
                    let mut echoed: u64 = 0;
                    loop {
                        let (result, chunk) = body.read(Vec::with_capacity(16 << 10)).await;
                        if chunk.is_empty() {
                            if matches!(result, wit_bindgen::StreamResult::Dropped) {
                                break;
                            }
                            continue;
                        }
                        echoed += chunk.len() as u64;
                        if !tx.write_all(chunk).await.is_empty() {
                            return;
                        }
                    }
                    drop(tx);
                    let trailers = Trailers::new();
                    trailers
                        .append("x-echoed", echoed.to_string().as_bytes())
                        .expect("valid trailer");
                    trailers_tx.write(Ok(Some(trailers))).await.ok();
                });
                Ok(response)
            }
            "/stream" => {
                let n: usize = param(query, "n").and_then(|v| v.parse().ok()).unwrap_or(16);
                let (mut tx, rx) = wit_stream::new();
                let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
                let (response, _result) = Response::new(Fields::new(), Some(rx), trailers_rx);
                drop(trailers_tx);
                wit_bindgen::spawn_local(async move {
                    for _ in 0..n {
                        if !tx.write_all(vec![b's'; 1024]).await.is_empty() {
                            return;
                        }
                        wit_bindgen::yield_async().await;
                    }
                });
                Ok(response)
            }
            _ => text("testbed3: no such path\n".into()),
        }
    }
}
