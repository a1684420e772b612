//! A WASI 0.3 `wasi:http/service` guest that answers every request with
//! `200` and a greeting (or the `GREETING` variable from the formation's
//! `env`): the 0.3 twin of `hello`, and what `bench/http3.sh` serves, unchanged,
//! under wasmproc and `wasmtime serve -Sp3`.

use std::sync::OnceLock;

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(Hello3);

struct Hello3;

impl wasip3::exports::http::handler::Guest for Hello3 {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        // Made once per instance: reused instances skip it.
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
        let (mut body, contents) = wit_stream::new();
        let (trailers, no_trailers) = wit_future::new(|| Ok(None));
        drop(trailers);
        let (response, _result) = Response::new(headers, Some(contents), no_trailers);
        let greeting = greeting.as_bytes().to_vec();
        wit_bindgen::spawn_local(async move {
            // A client gone before the body is its own business.
            let _ = body.write_all(greeting).await;
        });
        Ok(response)
    }
}
