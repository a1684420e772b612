//! wasmproc: the 12-factor process model on WebAssembly.
//!
//! A formation file names process types; each is a WASI 0.2 component; one
//! host runs many isolated, limited instances of each and routes units of
//! work (HTTP requests, queue messages, schedule ticks) to them. The modules
//! follow the path of a unit of work:
//!
//! | module | holds | where to look for |
//! |---|---|---|
//! | [`formation`] | the file, parsed and validated, with located errors; each type's [`Role`](formation::Role) | what a key means, its default and bounds |
//! | [`engine`] | the wasmtime engine sized from the formation, the epoch ticker, the compile cache | how the pooling allocator is sized |
//! | [`instance`] | one instance's store state and sandbox | what a guest may reach |
//! | [`outbound`] | outbound HTTP from guests: the allow list, and sending | which hosts a guest can call |
//! | [`pool`] | admission, slots, reuse, failure and supervision per type | when an instance is retired ([`pool::slots`]), crash loops ([`pool::supervisor`]) |
//! | [`router`] | which web type serves a host and path | route matching |
//! | [`http`] | the HTTP front: one request as a unit, the answers the host writes | what a 503 looks like ([`http`]'s `answers`) |
//! | [`worker`] | the loop that feeds a queue to a worker pool and settles each message | what happens when a worker returns `retry` |
//! | [`clock`] | the scheduler of clock instances | when a tick is skipped |
//! | [`queue`] | durable queues: the embedded store and Redis Streams | the at-least-once contract |
//! | [`keyvalue`] | `wasi:keyvalue` on the same kind of store | bucket grants and bounds |
//! | [`control`] | the running host's control plane: scale, deploy, reload, `ps` | what SIGHUP changes |
//! | `admin` | the admin API over the control plane | the admin routes and their errors |
//! | `accept` | the accept loop every listener uses | what happens when descriptors run out |
//! | `autoscale` | the sampler and autoscaler | why a type scaled |
//! | `metrics` | the Prometheus registry | the metric names |
//! | `bindings` | the host side of the wasmproc WIT package | the generated types |
//! | [`client`] | the CLI's side of the admin API | how the CLI finds a host |
//! | [`run`] | `check` and `run`, start to shutdown | the order of start-up |
//! | [`dev`] | `wasmproc dev`: watch, rebuild, redeploy | what a save triggers |
//! | [`telemetry`] | logs on stdout | the log format |
//! | `throttle` | a token bucket for what guests make the host do over and over | guest log rates |

mod accept;
mod admin;
mod autoscale;
mod bindings;
pub mod client;
pub mod clock;
pub mod control;
pub mod dev;
pub mod engine;
pub mod formation;
pub mod http;
pub mod instance;
pub mod keyvalue;
mod metrics;
pub mod outbound;
pub mod pool;
pub mod queue;
pub mod router;
pub mod run;
pub mod telemetry;
mod throttle;
pub mod worker;
