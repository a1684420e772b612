//! Write wasmproc guests in a few lines.
//!
//! ```ignore
//! // A worker: handles messages from its queue.
//! wasmproc_guest::worker!(Mailer);
//! struct Mailer;
//! impl Worker for Mailer {
//!     fn handle(delivery: Delivery) -> Outcome {
//!         println!("sending {}", String::from_utf8_lossy(&delivery.body));
//!         Outcome::Ok
//!     }
//! }
//! ```
//!
//! ```ignore
//! // A clock: runs on its schedule.
//! wasmproc_guest::clock!(Report);
//! struct Report;
//! impl Clock for Report {
//!     fn on_tick(tick: Tick) -> Result<(), String> {
//!         enqueue("emails", "daily report").map(|_| ()).map_err(|e| format!("{e:?}"))
//!     }
//! }
//! ```
//!
//! A web guest (built with the `wasip2` crate's `wasi:http/proxy` export)
//! calls `wasmproc_guest::producer!();` to get `enqueue` too.
//!
//! Each macro generates, in your crate, the bindings of one world of the
//! wasmproc WIT package (`wit/wasmproc.wit`), exports your type, and brings
//! into scope: `queue` (the interface), `enqueue(queue, body)`, and the
//! world's own names (`Worker`, `Delivery`, `Outcome` or `Clock`, `Tick`).
//! Your crate must depend on this one as `wasmproc-guest`.

#[doc(hidden)]
pub use wit_bindgen;

include!(concat!(env!("OUT_DIR"), "/macros.rs"));
