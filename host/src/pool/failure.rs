//! Why a unit of work failed, named from what wasmtime reports.

use wasmtime::Trap;

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
    /// No instance could be created.
    Instantiate(String),
    /// The guest returned without answering.
    NoResponse,
}

impl Failure {
    /// Every reason, as [`Failure::reason`] spells it.
    pub const REASONS: [&'static str; 6] = [
        "trap",
        "timeout",
        "fuel",
        "memory",
        "instantiate",
        "no-response",
    ];

    /// A one-word reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Trap(_) => "trap",
            Failure::Timeout => "timeout",
            Failure::Fuel => "fuel",
            Failure::Memory => "memory",
            Failure::Instantiate(_) => "instantiate",
            Failure::NoResponse => "no-response",
        }
    }

    /// What the guest or wasmtime said, where there is more to say than the
    /// reason (a trap's message); empty otherwise.
    pub fn detail(&self) -> &str {
        match self {
            Failure::Trap(message) | Failure::Instantiate(message) => message,
            Failure::Timeout | Failure::Fuel | Failure::Memory | Failure::NoResponse => "",
        }
    }
}

/// Names the failure behind a wasmtime error.
pub(crate) fn classify(error: &wasmtime::Error, state: &InstanceState) -> Failure {
    if state.memory_exceeded {
        return Failure::Memory;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::Fuel,
        Some(Trap::Interrupt) => Failure::Timeout,
        Some(trap) => Failure::Trap(trap.to_string()),
        None => Failure::Trap(format!("{error:#}")),
    }
}
