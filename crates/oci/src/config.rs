//! The runtime settings of an image (`config` in the image configuration blob).

use std::collections::BTreeMap;

use crate::spec::{ConfigFile, ContainerConfig};
use crate::OciError;

/// The parts of an image configuration that a template build uses to start the image's process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=value` entries, in image order.
    pub env: Vec<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// Exposed ports as written in the image, e.g. `8080/tcp`.
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Docker's `SHELL` setting; OCI images have none.
    pub shell: Option<Vec<String>>,
}

impl ImageConfig {
    /// Parses an image configuration blob.
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Self, OciError> {
        let file: ConfigFile =
            serde_json::from_slice(bytes).map_err(|err| OciError::json(what, err))?;
        Ok(Self::from_container_config(file.config.unwrap_or_default()))
    }

    fn from_container_config(config: ContainerConfig) -> Self {
        ImageConfig {
            env: config.env.unwrap_or_default(),
            user: config.user.filter(|user| !user.is_empty()),
            working_dir: config.working_dir.filter(|dir| !dir.is_empty()),
            cmd: config.cmd,
            entrypoint: config.entrypoint,
            exposed_ports: config
                .exposed_ports
                .unwrap_or_default()
                .into_keys()
                .collect(),
            labels: config.labels.unwrap_or_default(),
            shell: config.shell,
        }
    }

    /// Builds the `config` object of an image configuration blob.
    pub(crate) fn to_container_config(&self) -> ContainerConfig {
        let exposed_ports = self
            .exposed_ports
            .iter()
            .map(|port| (port.clone(), serde_json::json!({})));
        ContainerConfig {
            user: self.user.clone(),
            exposed_ports: (!self.exposed_ports.is_empty()).then(|| exposed_ports.collect()),
            env: (!self.env.is_empty()).then(|| self.env.clone()),
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            working_dir: self.working_dir.clone(),
            labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
            shell: self.shell.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_reads_docker_config() {
        let json = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin", "A=b"], "User": "1000:1000", "WorkingDir": "/app",
                "Cmd": ["serve"], "Entrypoint": ["/bin/app"], "ExposedPorts": {"8080/tcp": {}},
                "Labels": {"k": "v"}, "Shell": ["/bin/bash", "-c"]
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#;
        let config = ImageConfig::from_json(json, "test config").unwrap();
        assert_eq!(config.env, vec!["PATH=/usr/bin", "A=b"]);
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        assert_eq!(config.working_dir.as_deref(), Some("/app"));
        assert_eq!(config.cmd, Some(vec!["serve".to_owned()]));
        assert_eq!(config.entrypoint, Some(vec!["/bin/app".to_owned()]));
        assert_eq!(config.exposed_ports, vec!["8080/tcp"]);
        assert_eq!(config.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            config.shell,
            Some(vec!["/bin/bash".to_owned(), "-c".to_owned()])
        );
    }

    #[test]
    fn from_json_accepts_missing_config_and_empty_user() {
        let config = ImageConfig::from_json(br#"{"config": {"User": ""}}"#, "test").unwrap();
        assert_eq!(config.user, None);
        assert_eq!(
            ImageConfig::from_json(b"{}", "test").unwrap(),
            ImageConfig::default()
        );
    }

    #[test]
    fn container_config_round_trips() {
        let config = ImageConfig {
            env: vec!["A=1".into()],
            user: Some("app".into()),
            working_dir: Some("/w".into()),
            cmd: Some(vec!["run".into()]),
            entrypoint: None,
            exposed_ports: vec!["80/tcp".into()],
            labels: BTreeMap::from([("a".into(), "b".into())]),
            shell: None,
        };
        let file = ConfigFile {
            config: Some(config.to_container_config()),
            ..Default::default()
        };
        let json = serde_json::to_vec(&file).unwrap();
        assert_eq!(ImageConfig::from_json(&json, "test").unwrap(), config);
    }
}
