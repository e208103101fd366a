//! Validation of template names, tags, file hashes and build sizes.

use crate::error::ApiError;

/// Maximum length of a template name or a tag, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Maximum length of a file hash. The SDK sends lowercase hex SHA-256 (64 characters).
pub const MAX_HASH_LEN: usize = 128;

/// Virtual CPUs of a build when the request sets none.
pub const DEFAULT_VCPUS: u32 = 2;
/// Guest memory in MiB of a build when the request sets none.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Accepted range of `cpuCount`.
pub const VCPU_RANGE: std::ops::RangeInclusive<i64> = 1..=64;
/// Accepted range of `memoryMB`, in MiB.
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<i64> = 128..=262_144;
/// Accepted range of `minFreeDiskMb`, in MiB.
pub const MIN_FREE_DISK_MB_RANGE: std::ops::RangeInclusive<i64> = 0..=1_048_576;

/// A template name with its optional tag, both validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameAndTag {
    pub name: String,
    pub tag: Option<String>,
}

/// Parses `name` or `name:tag`. Names and tags use lowercase letters, digits, `-`, `_`
/// and `.`, start with a letter or digit and are at most [`MAX_NAME_LEN`] bytes long.
pub fn parse_name_and_tag(field: &str, value: &str) -> Result<NameAndTag, ApiError> {
    let (name, tag) = match value.split_once(':') {
        Some((name, tag)) => (name, Some(tag)),
        None => (value, None),
    };
    check_name(field, name)?;
    if let Some(tag) = tag {
        check_tag(field, tag)?;
    }
    Ok(NameAndTag {
        name: name.to_owned(),
        tag: tag.map(str::to_owned),
    })
}

/// Checks a tag with the rules of [`parse_name_and_tag`].
pub fn check_tag(field: &str, tag: &str) -> Result<(), ApiError> {
    check_word(field, "tag", tag)
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    check_word(field, "name", name)
}

fn check_word(field: &str, kind: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::bad_request(format!("invalid {field}: the {kind} is empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "invalid {field}: the {kind} {value:?} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    if !value.chars().all(allowed) {
        return Err(ApiError::bad_request(format!(
            "invalid {field}: the {kind} {value:?} may contain only lowercase letters, digits, '-', '_' and '.'"
        )));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(ApiError::bad_request(format!(
            "invalid {field}: the {kind} {value:?} must start with a letter or a digit"
        )));
    }
    Ok(())
}

/// Checks a file hash: 1 to [`MAX_HASH_LEN`] characters from `A-Z`, `a-z`, `0-9`, `_` and
/// `-`, so that it is safe as a file name.
pub fn check_hash(field: &str, hash: &str) -> Result<(), ApiError> {
    let valid = !hash.is_empty()
        && hash.len() <= MAX_HASH_LEN
        && hash.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {field} {hash:?}: expected 1 to {MAX_HASH_LEN} characters from A-Z, a-z, 0-9, '_' and '-' \
             (the SDK sends a hex SHA-256)"
        )))
    }
}

/// Checks an optional size against `range`, returning `default` when it is unset.
pub fn size_in_range(
    field: &str,
    value: Option<i64>,
    range: std::ops::RangeInclusive<i64>,
    default: u32,
) -> Result<u32, ApiError> {
    match value {
        None => Ok(default),
        Some(value) if range.contains(&value) => Ok(value as u32),
        Some(value) => Err(ApiError::bad_request(format!(
            "invalid {field} {value}: expected {} to {}",
            range.start(),
            range.end()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_with_tag_parses() {
        let parsed = parse_name_and_tag("name", "my-app.v2:stable_1").unwrap();
        assert_eq!(parsed.name, "my-app.v2");
        assert_eq!(parsed.tag.as_deref(), Some("stable_1"));
    }

    #[test]
    fn invalid_names_are_rejected() {
        for value in ["", "My", "-app", "a b", "a:", ":t", "a:B", "a:b:c", &"x".repeat(129)] {
            assert!(parse_name_and_tag("name", value).is_err(), "{value:?} was accepted");
        }
    }

    #[test]
    fn hash_rules() {
        assert!(check_hash("hash", &"a".repeat(64)).is_ok());
        assert!(check_hash("hash", "abc_DEF-1").is_ok());
        assert!(check_hash("hash", "../etc").is_err());
        assert!(check_hash("hash", "").is_err());
        assert!(check_hash("hash", &"a".repeat(129)).is_err());
    }

    #[test]
    fn sizes_use_default_and_range() {
        assert_eq!(size_in_range("cpuCount", None, VCPU_RANGE, 2).unwrap(), 2);
        assert_eq!(size_in_range("cpuCount", Some(4), VCPU_RANGE, 2).unwrap(), 4);
        assert!(size_in_range("cpuCount", Some(0), VCPU_RANGE, 2).is_err());
    }
}
