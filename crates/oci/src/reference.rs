//! Image references such as `alpine`, `localhost:5000/team/app:1.2` or `ubuntu@sha256:...`, parsed
//! with the normalisation rules of the Docker CLI: no registry means Docker Hub (`docker.io`), and a
//! one-component Docker Hub name gets the `library/` prefix.

use std::fmt;

use crate::digest::sha256_hex;
use crate::OciError;

pub const DOCKER_HUB: &str = "docker.io";
/// Host that serves the registry API for `docker.io` names.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LENGTH: usize = 255;
const MAX_TAG_LENGTH: usize = 128;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry host with optional port, e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/alpine`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>` manifest digest; takes precedence over the tag when pulling.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses and normalises a reference. Rejects empty names, upper-case repositories, bad tags and
    /// digests that are not `sha256:<64 hex>`.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let invalid = |reason: &str| OciError::InvalidReference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };

        if s.is_empty() {
            return Err(invalid("the reference is empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "the reference contains whitespace or control characters",
            ));
        }

        let (name_and_tag, digest) = match s.split_once('@') {
            Some((name, digest)) => {
                sha256_hex(digest)
                    .map_err(|_| invalid("the digest must be sha256:<64 lowercase hex digits>"))?;
                (name, Some(digest.to_owned()))
            }
            None => (s, None),
        };

        let last_slash = name_and_tag.rfind('/');
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => (
                &name_and_tag[..colon],
                Some(name_and_tag[colon + 1..].to_owned()),
            ),
            _ => (name_and_tag, None),
        };
        if let Some(tag) = &tag {
            if !is_valid_tag(tag) {
                return Err(invalid(
                    "the tag must be 1 to 128 characters of letters, digits, '_', '.' and '-', not starting with '.' or '-'",
                ));
            }
        }

        let (registry, repository) = split_registry(name);
        if registry.is_empty() || !is_valid_registry(registry) {
            return Err(invalid("the registry host is invalid"));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        };

        if repository.is_empty() {
            return Err(invalid("the repository name is empty"));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("the repository name must be lower case"));
        }
        if !repository.split('/').all(is_valid_path_component) {
            return Err(invalid(
                "each repository path component must be lower-case letters and digits, separated by '.', '_', '__' or '-'",
            ));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LENGTH {
            return Err(invalid("the name is longer than 255 characters"));
        }

        Ok(ImageReference {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// Returns the manifest to request: the digest when present, else the tag, else `latest`.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// Returns the tag to push to or select by: the tag, else `latest`.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or(DEFAULT_TAG)
    }

    /// Returns the host (and port) that serves the registry API for this reference.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageReference {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageReference::parse(s)
    }
}

/// Splits `host[:port]/path` into registry and repository. The first component is a registry only
/// when it looks like a host: it contains '.' or ':', starts with '[', or is `localhost`.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first.starts_with('[')
                || first == "localhost" =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

fn is_valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((address, after)) => {
                if address.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match after {
                    "" => return true,
                    _ => match after.strip_prefix(':') {
                        Some(port) => ("", Some(port)),
                        None => return false,
                    },
                }
            }
            None => return false,
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };

    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if registry.starts_with('[') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks one repository path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    if bytes.is_empty()
        || !is_alphanumeric_lower(bytes[0])
        || !is_alphanumeric_lower(bytes[bytes.len() - 1])
    {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alphanumeric_lower(bytes[i]) {
            i += 1;
            continue;
        }
        let separator_start = i;
        while i < bytes.len() && !is_alphanumeric_lower(bytes[i]) {
            i += 1;
        }
        let separator = &component[separator_start..i];
        let allowed = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !allowed {
            return false;
        }
    }
    true
}

fn is_alphanumeric_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LENGTH
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> ImageReference {
        ImageReference::parse(s).unwrap_or_else(|err| panic!("{s}: {err}"))
    }

    #[test]
    fn parse_short_name_defaults_to_docker_hub_library() {
        let reference = parse("alpine");
        assert_eq!(reference.registry, "docker.io");
        assert_eq!(reference.repository, "library/alpine");
        assert_eq!(reference.tag, None);
        assert_eq!(reference.manifest_reference(), "latest");
        assert_eq!(reference.api_host(), "registry-1.docker.io");
    }

    #[test]
    fn parse_docker_hub_user_repository_keeps_path() {
        let reference = parse("grafana/grafana:10.0");
        assert_eq!(reference.registry, "docker.io");
        assert_eq!(reference.repository, "grafana/grafana");
        assert_eq!(reference.tag.as_deref(), Some("10.0"));
    }

    #[test]
    fn parse_registry_with_port_and_tag() {
        let reference = parse("localhost:5000/a/b:tag");
        assert_eq!(reference.registry, "localhost:5000");
        assert_eq!(reference.repository, "a/b");
        assert_eq!(reference.tag.as_deref(), Some("tag"));
    }

    #[test]
    fn parse_registry_port_without_tag() {
        let reference = parse("127.0.0.1:5000/app");
        assert_eq!(reference.registry, "127.0.0.1:5000");
        assert_eq!(reference.repository, "app");
        assert_eq!(reference.tag, None);
    }

    #[test]
    fn parse_ipv6_registry() {
        let reference = parse("[::1]:5000/app:v1");
        assert_eq!(reference.registry, "[::1]:5000");
        assert_eq!(reference.repository, "app");
    }

    #[test]
    fn parse_digest_and_tag() {
        let reference = parse(&format!("ghcr.io/org/app:v1@{DIGEST}"));
        assert_eq!(reference.registry, "ghcr.io");
        assert_eq!(reference.tag.as_deref(), Some("v1"));
        assert_eq!(reference.digest.as_deref(), Some(DIGEST));
        assert_eq!(reference.manifest_reference(), DIGEST);
    }

    #[test]
    fn parse_index_docker_io_is_normalised() {
        assert_eq!(
            parse("index.docker.io/ubuntu").to_string(),
            "docker.io/library/ubuntu"
        );
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "alpine",
            "alpine:3.20",
            "localhost:5000/a/b:tag",
            "quay.io/coreos/etcd",
            &format!("ubuntu@{DIGEST}"),
            &format!("127.0.0.1:5000/x/y:z@{DIGEST}"),
        ] {
            let first = parse(input);
            let second = parse(&first.to_string());
            assert_eq!(first, second, "{input}");
        }
    }

    #[test]
    fn parse_rejects_bad_input() {
        for input in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "alpine@sha256:1234",
            "alpine@md5:0123",
            "a b",
            "reg.io/",
            "reg.io//x",
            "reg.io/x/../y",
            "x__-y",
            "localhost:port/x",
            "-bad.io/x",
        ] {
            assert!(
                ImageReference::parse(input).is_err(),
                "{input:?} was accepted"
            );
        }
    }

    #[test]
    fn parse_error_names_reference_and_reason() {
        let message = ImageReference::parse("Alpine").unwrap_err().to_string();
        assert!(message.contains("\"Alpine\""), "{message}");
        assert!(message.contains("lower case"), "{message}");
    }
}
