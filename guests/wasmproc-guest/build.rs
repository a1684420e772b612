//! Turns `wit/wasmproc.wit` into the `worker!`, `clock!` and `producer!`
//! macros: each expands, in the guest crate, to `wit_bindgen::generate!`
//! with the WIT inline. So the guest crate holds the bindings of exactly
//! the world it targets (two worlds' bindings in one component would make
//! it owe the exports of both), and the WIT has one source.

use std::path::Path;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let wit_path = Path::new(&manifest).join("../../wit/wasmproc.wit");
    println!("cargo:rerun-if-changed={}", wit_path.display());
    let wit = std::fs::read_to_string(&wit_path).expect("read wit/wasmproc.wit");
    let world = |name: &str, macro_name: &str, doc: &str, extra: &str| {
        format!(
            r####"
{doc}
#[macro_export]
macro_rules! {macro_name} {{
    ($($ty:ident)?) => {{
        $crate::wit_bindgen::generate!({{
            inline: r###"{wit}"###,
            world: "wasmproc:host/{name}",
            runtime_path: "wasmproc_guest::wit_bindgen::rt",
        }});
        $( export!($ty); )?
        {extra}
        pub use self::wasmproc::host::queue;

        /// Enqueues `body` onto `queue` (which the formation must list in
        /// this process type's `enqueue`); returns the message id.
        #[allow(dead_code)]
        pub fn enqueue(queue: &str, body: impl Into<Vec<u8>>) -> Result<String, queue::EnqueueError> {{
            queue::enqueue(queue, &queue::Message {{
                body: body.into(),
                content_type: None,
                headers: Vec::new(),
                delay_ms: None,
            }})
        }}
    }};
}}
"####
        )
    };
    let mut out = String::new();
    out.push_str(&world(
        "worker",
        "worker",
        "/// Makes this crate a worker: `wasmproc_guest::worker!(MyWorker);` then\n/// `impl Worker for MyWorker {{ fn handle(delivery: Delivery) -> Outcome {{ … }} }}`.",
        "pub use self::exports::wasmproc::host::handler::{Delivery, Guest as Worker, Outcome};",
    ));
    out.push_str(&world(
        "clock",
        "clock",
        "/// Makes this crate a clock: `wasmproc_guest::clock!(MyClock);` then\n/// `impl Clock for MyClock {{ fn on_tick(tick: Tick) -> Result<(), String> {{ … }} }}`.",
        "pub use self::exports::wasmproc::host::scheduled::{Guest as Clock, Tick};",
    ));
    out.push_str(&world(
        "producer",
        "producer",
        "/// Gives any guest (a web guest, say) the `queue` import: `wasmproc_guest::producer!();`\n/// then `enqueue(\"emails\", body)`.",
        "",
    ));
    let dest = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("macros.rs");
    std::fs::write(dest, out).expect("write macros.rs");
}
