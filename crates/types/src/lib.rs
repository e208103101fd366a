//! Types shared by every Hearth part: identifiers and the fixed facts of the guest
//! network that a snapshot depends on.

pub mod guest;
pub mod ids;

pub use ids::{BuildId, SandboxId, TemplateId};
