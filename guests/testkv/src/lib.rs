//! A `wasi:http/proxy` guest that uses the standard `wasi:config` and
//! `wasi:keyvalue` interfaces, as a component written for another host
//! would. The request path chooses what it does:
//!
//! | path                                 | what the guest does                              |
//! |--------------------------------------|--------------------------------------------------|
//! | `/config?key=K`                      | answers the value of K, or `unset`               |
//! | `/config`                            | answers every `K=V`, one a line                  |
//! | `/open?bucket=B`                     | opens B: `ok`, or the error                      |
//! | `/get?bucket=B&key=K`                | answers the value of K, or `none`                |
//! | `/set?bucket=B&key=K&value=V`        | sets K to V: `ok`, or the error                  |
//! | `/big?bucket=B&key=K&bytes=N`        | sets K to N bytes: `ok`, or the error            |
//! | `/incr?bucket=B&key=K&by=N`          | adds N to the counter K: its new value           |
//! | `/delete?bucket=B&key=K`             | removes K: `ok`                                  |
//! | `/list?bucket=B`                     | answers every key, one a line                    |

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    inline: "
        package wasmproc:testkv;
        world testkv {
            import wasi:config/store@0.2.0-rc.1;
            import wasi:keyvalue/store@0.2.0-draft;
            import wasi:keyvalue/atomics@0.2.0-draft;
            import wasi:keyvalue/batch@0.2.0-draft;
        }
    ",
    path: ["../../wit/deps/config", "../../wit/deps/keyvalue"],
    world: "wasmproc:testkv/testkv",
    generate_all,
});

use wasi::config::store as config;
use wasi::keyvalue::{atomics, store};

wasip2::http::proxy::export!(TestKv);

struct TestKv;

fn param(query: &str, name: &str) -> String {
    query
        .split('&')
        .find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.to_string())
        })
        .unwrap_or_default()
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut stream = outgoing.write().expect("stream is taken once");
    for chunk in body.chunks(4096) {
        stream.write_all(chunk).expect("write response body");
    }
    stream.flush().expect("flush response body");
    drop(stream);
    OutgoingBody::finish(outgoing, None).expect("finish response body");
}

/// Runs `op` on the bucket named in the query, or answers the error of
/// opening it.
fn with_bucket(query: &str, op: impl FnOnce(&store::Bucket) -> String) -> String {
    match store::open(&param(query, "bucket")) {
        Ok(bucket) => op(&bucket),
        Err(e) => format!("error: {e:?}"),
    }
}

fn answer<T: std::fmt::Debug>(
    result: Result<T, store::Error>,
    ok: impl FnOnce(T) -> String,
) -> String {
    match result {
        Ok(value) => ok(value),
        Err(e) => format!("error: {e:?}"),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for TestKv {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((path_with_query.as_str(), ""));
        let key = param(query, "key");
        let text = match path {
            "/config" if query.is_empty() => match config::get_all() {
                Ok(all) => all.iter().map(|(k, v)| format!("{k}={v}\n")).collect(),
                Err(e) => format!("error: {e:?}"),
            },
            "/config" => match config::get(&key) {
                Ok(Some(value)) => value,
                Ok(None) => "unset".into(),
                Err(e) => format!("error: {e:?}"),
            },
            "/open" => with_bucket(query, |_| "ok".into()),
            "/get" => with_bucket(query, |b| {
                answer(b.get(&key), |v| {
                    v.map_or_else(
                        || "none".into(),
                        |v| String::from_utf8_lossy(&v).into_owned(),
                    )
                })
            }),
            "/set" => with_bucket(query, |b| {
                answer(b.set(&key, param(query, "value").as_bytes()), |()| {
                    "ok".into()
                })
            }),
            "/big" => with_bucket(query, |b| {
                let n: usize = param(query, "bytes").parse().unwrap_or(0);
                answer(b.set(&key, &vec![b'v'; n]), |()| "ok".into())
            }),
            "/incr" => with_bucket(query, |b| {
                let by: u64 = param(query, "by").parse().unwrap_or(1);
                answer(atomics::increment(b, &key, by), |n| n.to_string())
            }),
            "/delete" => with_bucket(query, |b| answer(b.delete(&key), |()| "ok".into())),
            "/list" => with_bucket(query, |b| {
                let mut keys = Vec::new();
                let mut cursor = None;
                loop {
                    match b.list_keys(cursor) {
                        Ok(page) => {
                            keys.extend(page.keys);
                            match page.cursor {
                                Some(next) => cursor = Some(next),
                                None => break keys.iter().map(|k| format!("{k}\n")).collect(),
                            }
                        }
                        Err(e) => break format!("error: {e:?}"),
                    }
                }
            }),
            _ => "testkv: no such path".into(),
        };
        respond(out, 200, format!("{text}\n").as_bytes());
    }
}
