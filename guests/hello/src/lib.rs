//! A `wasi:http/proxy` guest that answers every request with `200` and a
//! greeting (or the `GREETING` variable from the formation's `env`).
//! It is the component the examples and the benchmarks serve, and it runs
//! unchanged under `wasmtime serve`.

use std::sync::OnceLock;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hello);

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        // Made once per instance: with `reuse`, later requests skip looking
        // the variable up and formatting the greeting.
        static GREETING: OnceLock<String> = OnceLock::new();
        let greeting = GREETING.get_or_init(|| {
            let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_string());
            format!("{greeting} from wasmproc\n")
        });
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .expect("static header is valid");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().expect("stream is taken once");
        // One host call per 4096 bytes (the most one call may write);
        // `std::io::Write` would make three (check, write, flush).
        for chunk in greeting.as_bytes().chunks(4096) {
            out.blocking_write_and_flush(chunk)
                .expect("write response body");
        }
        drop(out);
        OutgoingBody::finish(body, None).expect("finish response body");
    }
}
