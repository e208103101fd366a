//! Identifier newtypes, so a sandbox ID is never passed where a template ID belongs.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Alphabet of generated IDs: lowercase letters and digits, valid in a DNS label.
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Length of generated sandbox, template and build IDs.
const ID_LEN: usize = 20;

/// Maximum length accepted when parsing an ID from a request.
const MAX_ID_LEN: usize = 63;

/// Error for a string that is not a valid ID.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} ID {value:?}: expected 1 to {MAX_ID_LEN} characters from [a-z0-9-_]")]
pub struct InvalidId {
    kind: &'static str,
    value: String,
}

fn random_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char)
        .collect()
}

fn is_valid_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("Identifier of a ", $kind, ".")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Generates a new random ID.
            pub fn generate() -> Self {
                Self(random_id())
            }

            /// Parses an ID received from outside, rejecting characters that are unsafe in
            /// paths and host names.
            pub fn parse(value: &str) -> Result<Self, InvalidId> {
                if is_valid_id(value) {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(InvalidId { kind: $kind, value: value.to_owned() })
                }
            }

            /// Returns the ID as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(SandboxId, "sandbox");
id_type!(TemplateId, "template");
id_type!(BuildId, "build");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_parses() {
        let id = SandboxId::generate();
        assert_eq!(SandboxId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn parse_rejects_path_characters() {
        assert!(SandboxId::parse("../etc").is_err());
        assert!(SandboxId::parse("a/b").is_err());
    }

    #[test]
    fn parse_rejects_empty_and_long() {
        assert!(TemplateId::parse("").is_err());
        assert!(TemplateId::parse(&"a".repeat(64)).is_err());
    }
}
