//! A `wasi:http/proxy` guest whose behaviour is chosen by the request path, so
//! one component can exercise every way a guest can misbehave:
//!
//! | path                | what the guest does                                        |
//! |---------------------|------------------------------------------------------------|
//! | `/`                 | answers `testbed ok`                                       |
//! | `/trap`             | panics (a trap)                                            |
//! | `/loop`             | spins forever (stopped by the timeout or the fuel budget) |
//! | `/memory`           | allocates 1 MiB blocks until memory runs out               |
//! | `/sleep?ms=N`       | logs `sleeping N ms`, sleeps N ms, then answers (`&bytes=B`: B bytes) |
//! | `/counter`          | increments a global and answers its value                  |
//! | `/env?name=X`       | answers the value of X, or `unset`                         |
//! | `/env`              | answers every variable it can see, one `K=V` per line      |
//! | `/file?path=P`      | tries to read P and answers the content or the error       |
//! | `/fetch?url=U`      | makes an outbound GET and answers the status or the error  |
//! | `/fanout?url=U&n=N` | starts N outbound GETs at once; answers `OUTCOME xCOUNT` lines |
//! | `/echo`             | answers the request body                                   |
//! | `/log?msg=M`        | prints M to stdout and to stderr                           |
//! | `/enqueue?queue=Q&body=B[&delay=MS][&size=N]` | enqueues B (padded with `x` to N bytes) onto Q, delayed MS ms; answers the id or the error |
//! | `/whoami?ms=N`      | sleeps N ms, then answers its instance name                |
//! | `/partial?bytes=N`  | answers 200, writes N bytes of its body, then traps        |
//! | `/noanswer`         | returns without answering                                  |
//! | `/fields?n=N&kib=K` | holds N header sets of K KiB each, then answers            |
//! | `/streams?n=N`      | holds N stdout streams, then answers                       |
//! | `/print?parts=a,b`  | writes each part to stderr with a write of its own         |
//! | `/flood?n=N`        | prints N lines to stdout as fast as it can                 |
//! | `/spin?us=N`        | computes for N µs of the monotonic clock, then answers     |
//! | `/random?bytes=N`   | asks the host for N random bytes in one call; answers how many it got or the trap |

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, FutureIncomingResponse, IncomingRequest, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};

wasip2::http::proxy::export!(Testbed);
wasmproc_guest::producer!();

struct Testbed;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.replace("%2F", "/").replace("%3A", ":"))
    })
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut stream = outgoing.write().expect("stream is taken once");
    // Write in chunks no larger than what the host accepts per call.
    for chunk in body.chunks(4096) {
        stream.write_all(chunk).expect("write response body");
    }
    stream.flush().expect("flush response body");
    drop(stream);
    OutgoingBody::finish(outgoing, None).expect("finish response body");
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("body is consumed once");
    let mut stream = body.stream().expect("stream is taken once");
    let mut bytes = Vec::new();
    let result = stream.read_to_end(&mut bytes);
    drop(stream);
    match result {
        Ok(_) => bytes,
        Err(e) => format!("body error: {e}").into_bytes(),
    }
}

/// Starts an outbound GET of `url` without waiting for the response.
fn start_fetch(url: &str) -> Result<FutureIncomingResponse, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", rest)) => (Scheme::Https, rest),
        Some((_, rest)) => (Scheme::Http, rest),
        None => (Scheme::Http, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).expect("GET is valid");
    request.set_scheme(Some(&scheme)).expect("scheme is valid");
    request
        .set_authority(Some(authority))
        .expect("authority is valid");
    request
        .set_path_with_query(Some(path))
        .expect("path is valid");
    let body = request.body().expect("body is taken once");
    OutgoingBody::finish(body, None).expect("empty body");
    outgoing_handler::handle(request, None).map_err(|code| format!("error: {code:?}"))
}

/// Waits for a started GET; answers its status or its error.
fn finish_fetch(future: FutureIncomingResponse) -> String {
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(response))) => format!("status {}", response.status()),
        Some(Ok(Err(code))) => format!("error: {code:?}"),
        other => format!("error: {other:?}"),
    }
}

fn fetch(url: &str) -> String {
    match start_fetch(url) {
        Ok(future) => finish_fetch(future),
        Err(error) => error,
    }
}

/// Starts `n` GETs of `url` before waiting for any; counts the outcomes.
fn fanout(url: &str, n: usize) -> String {
    let started: Vec<_> = (0..n).map(|_| start_fetch(url)).collect();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for fetch in started {
        let outcome = match fetch {
            Ok(future) => finish_fetch(future),
            Err(error) => error,
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    outcomes
        .iter()
        .map(|(outcome, count)| format!("{outcome} x{count}\n"))
        .collect()
}

impl wasip2::exports::http::incoming_handler::Guest for Testbed {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((path_with_query.as_str(), ""));
        match path {
            "/" => respond(out, 200, b"testbed ok\n"),
            "/trap" => panic!("testbed was asked to trap"),
            "/loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "/sleep" => {
                let ms: u64 = query_param(query, "ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100);
                println!("sleeping {ms} ms");
                std::thread::sleep(std::time::Duration::from_millis(ms));
                match query_param(query, "bytes").and_then(|v| v.parse().ok()) {
                    Some(n) => respond(out, 200, &vec![b'z'; n]),
                    None => respond(out, 200, format!("slept {ms}\n").as_bytes()),
                }
            }
            "/spin" => {
                let us: u64 = query_param(query, "us")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100);
                let until = std::time::Instant::now() + std::time::Duration::from_micros(us);
                let mut x: u64 = 0;
                while std::time::Instant::now() < until {
                    for _ in 0..100 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                respond(out, 200, format!("spun {us}\n").as_bytes());
            }
            "/random" => {
                let n: u64 = query_param(query, "bytes")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(16);
                let bytes = wasip2::random::random::get_random_bytes(n);
                respond(
                    out,
                    200,
                    format!("{} random bytes\n", bytes.len()).as_bytes(),
                );
            }
            "/counter" => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
                respond(out, 200, format!("{n}\n").as_bytes());
            }
            "/env" => match query_param(query, "name") {
                Some(name) => {
                    let value = std::env::var(&name).unwrap_or_else(|_| "unset".to_string());
                    respond(out, 200, format!("{value}\n").as_bytes());
                }
                None => {
                    let mut all = String::new();
                    for (k, v) in std::env::vars() {
                        all.push_str(&format!("{k}={v}\n"));
                    }
                    respond(out, 200, all.as_bytes());
                }
            },
            "/file" => {
                let path = query_param(query, "path").unwrap_or_else(|| "/etc/passwd".into());
                match std::fs::read_to_string(&path) {
                    Ok(content) => respond(out, 200, content.as_bytes()),
                    Err(e) => respond(out, 200, format!("denied: {e}\n").as_bytes()),
                }
            }
            "/fetch" => {
                let url = query_param(query, "url").unwrap_or_default();
                respond(out, 200, format!("{}\n", fetch(&url)).as_bytes());
            }
            "/fanout" => {
                let url = query_param(query, "url").unwrap_or_default();
                let n = query_param(query, "n")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                respond(out, 200, fanout(&url, n).as_bytes());
            }
            "/echo" => {
                let body = read_body(&request);
                respond(out, 200, &body);
            }
            "/log" => {
                let msg = query_param(query, "msg").unwrap_or_else(|| "hello".into());
                println!("{msg}");
                eprintln!("{msg} on stderr");
                respond(out, 200, b"logged\n");
            }
            "/whoami" => {
                let ms: u64 = query_param(query, "ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                let me = std::env::var("WASMPROC_INSTANCE").unwrap_or_default();
                respond(out, 200, format!("{me}\n").as_bytes());
            }
            "/enqueue" => {
                let queue = query_param(query, "queue").unwrap_or_default();
                let mut body = query_param(query, "body").unwrap_or_default().into_bytes();
                if let Some(size) = query_param(query, "size").and_then(|n| n.parse().ok()) {
                    body.resize(size, b'x');
                }
                let delay_ms = query_param(query, "delay").and_then(|ms| ms.parse().ok());
                let message = queue::Message {
                    body,
                    content_type: None,
                    headers: Vec::new(),
                    delay_ms,
                };
                match queue::enqueue(&queue, &message) {
                    Ok(id) => respond(out, 200, format!("enqueued {id}\n").as_bytes()),
                    Err(e) => respond(out, 200, format!("error: {e:?}\n").as_bytes()),
                }
            }
            "/partial" => {
                let n: usize = query_param(query, "bytes")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(4096);
                let response = OutgoingResponse::new(Fields::new());
                let outgoing = response.body().expect("body is taken once");
                ResponseOutparam::set(out, Ok(response));
                let stream = outgoing.write().expect("stream is taken once");
                for chunk in vec![b'x'; n].chunks(4096) {
                    stream
                        .blocking_write_and_flush(chunk)
                        .expect("write response body");
                }
                panic!("testbed traps after answering");
            }
            "/noanswer" => drop(out),
            "/fields" => {
                let n: usize = query_param(query, "n")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let kib: usize = query_param(query, "kib")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let value = vec![b'v'; 1024];
                let mut held = Vec::new();
                for _ in 0..n {
                    let fields = Fields::new();
                    for k in 0..kib {
                        // Header names must differ; values may repeat.
                        let name = format!("x-{k}");
                        if fields.append(&name, &value).is_err() {
                            break;
                        }
                    }
                    held.push(fields);
                }
                respond(out, 200, format!("holding {}\n", held.len()).as_bytes());
            }
            "/streams" => {
                let n: usize = query_param(query, "n")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let held: Vec<_> = (0..n).map(|_| wasip2::cli::stdout::get_stdout()).collect();
                respond(out, 200, format!("holding {}\n", held.len()).as_bytes());
            }
            "/print" => {
                let parts = query_param(query, "parts").unwrap_or_default();
                let stderr = wasip2::cli::stderr::get_stderr();
                for part in parts.split(',') {
                    let part = part
                        .replace("%20", " ")
                        .replace("%0A", "\n")
                        .replace("%0D", "\r")
                        .replace("%1B", "\u{1b}");
                    stderr
                        .blocking_write_and_flush(part.as_bytes())
                        .expect("write stderr");
                }
                respond(out, 200, b"printed\n");
            }
            "/flood" => {
                let n: usize = query_param(query, "n")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000);
                for i in 0..n {
                    println!("flood line {i}");
                }
                respond(out, 200, format!("printed {n}\n").as_bytes());
            }
            _ => respond(out, 404, b"testbed: no such path\n"),
        }
    }
}
