//! A worker that keeps state in a `wasi:keyvalue` bucket: a message
//! `incr:BUCKET:KEY` adds one to the counter KEY and prints `counted N`.

wasmproc_guest::worker!(KvWorker);

/// The standard interfaces, in a module of their own beside the worker's.
mod kv {
    wit_bindgen::generate!({
        inline: "
            package wasmproc:kvworker;
            world kv {
                import wasi:keyvalue/store@0.2.0-draft;
                import wasi:keyvalue/atomics@0.2.0-draft;
            }
        ",
        path: ["../../wit/deps/keyvalue"],
        world: "wasmproc:kvworker/kv",
        generate_all,
    });
}

use kv::wasi::keyvalue::{atomics, store};

struct KvWorker;

impl Worker for KvWorker {
    fn handle(delivery: Delivery) -> Outcome {
        let body = String::from_utf8_lossy(&delivery.body).into_owned();
        let mut parts = body.splitn(3, ':');
        let (Some("incr"), Some(bucket), Some(key)) = (parts.next(), parts.next(), parts.next())
        else {
            return Outcome::Reject(format!("cannot read `{body}`"));
        };
        let counted = store::open(bucket).and_then(|b| atomics::increment(&b, key, 1));
        match counted {
            Ok(n) => {
                println!("counted {n}");
                Outcome::Ok
            }
            Err(e) => {
                eprintln!("cannot count: {e:?}");
                Outcome::Retry(None)
            }
        }
    }
}
