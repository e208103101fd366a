//! Hearth's control plane: the E2B-compatible REST API, its state and sandbox timeouts.

pub mod runtime;
