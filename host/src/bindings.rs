//! Host bindings of the wasmproc WIT package (`wit/`): the `queue` import
//! every kind of guest may use, and the exports of the `worker` and `clock`
//! worlds.

#![allow(missing_docs)]

/// The `wasmproc:host/worker` world (and the `queue` interface).
pub mod worker {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "wasmproc:host/worker",
        imports: { default: async },
        exports: { default: async },
    });
}

/// The `wasmproc:host/clock` world.
pub mod clock {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "wasmproc:host/clock",
        imports: { default: async },
        exports: { default: async },
        with: { "wasmproc:host/queue": super::worker::wasmproc::host::queue },
    });
}

pub use worker::wasmproc::host::queue;
