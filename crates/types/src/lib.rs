//! Types shared by every Hearth part: identifiers and the fixed facts of the guest
//! network that a snapshot depends on.

pub mod guest;
pub mod ids;

pub use ids::{BuildId, SandboxId, TemplateId};

/// Version of envd that this source tree builds. The SDK enables features by comparing
/// it with fixed versions, so it must not claim a feature envd does not implement in full.
pub const ENVD_VERSION: &str = "0.6.4";
