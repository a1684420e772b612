//! Why a unit of work failed, named from what wasmtime reports.
//!
//! A front may also fail a unit whose guest call returned normally (a web
//! guest that never answered), or name a failure the guest did not cause (a
//! client that hung up): it returns the [`Failure`] itself as the call's
//! error, and [`classify`] keeps it.

use std::fmt;

use wasmtime::Trap;
use wasmtime::component::ResourceTableError;
use wasmtime_wasi_http::FieldMapError;

use crate::instance::InstanceState;

/// Why a unit of work failed. Each failure discards the unit's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The guest trapped (or panicked).
    Trap(String),
    /// The unit ran past `limits.timeout`.
    Timeout,
    /// The unit burned its `limits.fuel`.
    Fuel,
    /// The guest tried to grow memory past `limits.memory`.
    Memory,
    /// The guest tried to hold more host resources than `limits.resources`.
    Resources,
    /// No instance could be created.
    Instantiate(String),
    /// The guest returned without answering.
    NoResponse,
    /// The client broke the exchange (hung up, too slow, too large): not
    /// the guest's fault, so never a step toward a crash loop.
    Client(&'static str),
}

impl Failure {
    /// Every reason, as [`Failure::reason`] spells it.
    pub const REASONS: [&'static str; 8] = [
        "trap",
        "timeout",
        "fuel",
        "memory",
        "resources",
        "instantiate",
        "no-response",
        "client",
    ];

    /// A one-word reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Trap(_) => "trap",
            Failure::Timeout => "timeout",
            Failure::Fuel => "fuel",
            Failure::Memory => "memory",
            Failure::Resources => "resources",
            Failure::Instantiate(_) => "instantiate",
            Failure::NoResponse => "no-response",
            Failure::Client(_) => "client",
        }
    }

    /// What the guest, wasmtime or the client did, where there is more to
    /// say than the reason; empty otherwise.
    pub fn detail(&self) -> &str {
        match self {
            Failure::Trap(message) | Failure::Instantiate(message) => message,
            Failure::Client(what) => what,
            Failure::Timeout
            | Failure::Fuel
            | Failure::Memory
            | Failure::Resources
            | Failure::NoResponse => "",
        }
    }

    /// Whether the guest is to blame: a crash-loop step.
    pub fn is_guests(&self) -> bool {
        !matches!(self, Failure::Client(_))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            "" => f.write_str(self.reason()),
            detail => write!(f, "{}: {detail}", self.reason()),
        }
    }
}

impl std::error::Error for Failure {}

/// Names the failure behind a wasmtime error.
pub(crate) fn classify(error: &wasmtime::Error, state: &InstanceState) -> Failure {
    if let Some(failure) = error.downcast_ref::<Failure>() {
        return failure.clone();
    }
    if state.memory_exceeded {
        return Failure::Memory;
    }
    if let Some(ResourceTableError::Full) = error.downcast_ref::<ResourceTableError>() {
        return Failure::Resources;
    }
    if let Some(FieldMapError::TotalSizeTooBig | FieldMapError::TooManyFields) =
        error.downcast_ref::<FieldMapError>()
    {
        return Failure::Resources;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::Fuel,
        Some(Trap::Interrupt) => Failure::Timeout,
        Some(trap) => Failure::Trap(trap.to_string()),
        None => Failure::Trap(format!("{error:#}")),
    }
}
