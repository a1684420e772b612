//! wasmproc: the 12-factor process model on WebAssembly.
//!
//! A formation file names process types; each is a WASI 0.2 component; one
//! host runs many isolated, limited instances of each and routes units of
//! work (HTTP requests, queue messages, schedule ticks) to them. The modules follow the path of a
//! request:
//!
//! - [`formation`]: the file, parsed and validated, with located errors;
//! - [`engine`]: the wasmtime engine sized from the formation, the epoch
//!   ticker and the compile cache;
//! - [`instance`]: one instance's store state and sandbox;
//! - [`pool`]: slots, admission, reuse, failure and supervision per type;
//! - [`router`] and [`http`]: the HTTP front;
//! - [`queue`] and [`worker`]: durable queues and the loop that feeds
//!   worker instances; [`clock`]: the scheduler of clock instances;
//! - [`bindings`]: the host side of the wasmproc WIT package;
//! - [`admin`]: the loopback control API;
//! - [`run`]: `check` and `run`, start to shutdown;
//! - [`telemetry`]: logs on stdout.

pub mod admin;
pub mod autoscale;
pub mod bindings;
pub mod client;
pub mod clock;
pub mod engine;
pub mod formation;
pub mod host;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod pool;
pub mod queue;
pub mod router;
pub mod run;
pub mod telemetry;
pub mod worker;
