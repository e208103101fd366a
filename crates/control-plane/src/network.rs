//! A sandbox's network settings: parsing the SDK's `network` object on create, the
//! `PUT /sandboxes/{id}/network` replacement, and the egress policy both turn into.

use axum::http::StatusCode;
use hearth_network::egress::{EgressPolicy, EgressSettings};
use hearth_types::SandboxId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::runtime::RuntimeError;
use crate::store::SandboxState;
use crate::ControlPlane;

/// Network settings of a sandbox as accepted, stored as JSON with the SDK's field names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSettings {
    /// `allowOut`: IPs, CIDRs and domain names that are always reachable.
    #[serde(rename = "allowOut", default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// `denyOut`: IPs and CIDRs that are not reachable unless allowed.
    #[serde(rename = "denyOut", default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// `dnsServers`; `None` means the SDK's default (8.8.8.8).
    #[serde(
        rename = "dnsServers",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dns_servers: Option<Vec<String>>,
    /// `allowPublicTraffic`; `false` makes the proxy require the traffic access token.
    #[serde(
        rename = "allowPublicTraffic",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_public_traffic: Option<bool>,
}

impl NetworkSettings {
    /// Builds the egress policy these settings and `allow_internet_access` describe.
    pub fn egress_policy(
        &self,
        allow_internet_access: Option<bool>,
    ) -> Result<EgressPolicy, ApiError> {
        EgressPolicy::from_settings(&EgressSettings {
            allow_internet_access,
            allow_out: &self.allow_out,
            deny_out: &self.deny_out,
            dns_servers: self.dns_servers.as_deref(),
        })
        .map_err(|err| ApiError::bad_request(err.to_string()))
    }

    /// Returns whether the proxy requires the traffic access token for the sandbox's ports.
    pub fn requires_traffic_token(&self) -> bool {
        self.allow_public_traffic == Some(false)
    }
}

/// Body of `PUT /sandboxes/{sandboxID}/network`: the new egress settings. A field left out
/// is cleared, as the SDK documents.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    #[serde(rename = "allowOut")]
    pub allow_out: Option<Vec<String>>,
    #[serde(rename = "denyOut")]
    pub deny_out: Option<Vec<String>>,
    #[serde(rename = "dnsServers")]
    pub dns_servers: Option<Vec<String>>,
    /// SOCKS5 egress proxy; must be null or absent (not supported).
    #[serde(rename = "egressProxy")]
    #[schema(value_type = Option<Object>)]
    pub egress_proxy: Option<Value>,
    /// Per-domain request transforms; must be empty or absent (not supported).
    #[schema(value_type = Option<Object>)]
    pub rules: Option<Value>,
    /// False denies every destination, as a `denyOut` of `0.0.0.0/0` does.
    pub allow_internet_access: Option<bool>,
}

/// Parses the `network` object of a create request. Settings Hearth does not implement
/// are accepted only at their defaults.
pub(crate) fn parse_create_network(network: Option<&Value>) -> Result<NetworkSettings, ApiError> {
    let fields = match network {
        None | Some(Value::Null) => return Ok(NetworkSettings::default()),
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err(ApiError::bad_request("invalid network: expected an object")),
    };
    let mut settings = NetworkSettings::default();
    for (name, value) in fields {
        match name.as_str() {
            "allowPublicTraffic" => {
                settings.allow_public_traffic = match value {
                    Value::Null => None,
                    Value::Bool(allowed) => Some(*allowed),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "invalid network.allowPublicTraffic {other}: expected true or false"
                        )))
                    }
                }
            }
            "allowOut" => settings.allow_out = string_list("allowOut", value)?.unwrap_or_default(),
            "denyOut" => settings.deny_out = string_list("denyOut", value)?.unwrap_or_default(),
            "dnsServers" => settings.dns_servers = string_list("dnsServers", value)?,
            other => reject_unsupported(other, value)?,
        }
    }
    Ok(settings)
}

/// Reads a JSON list of strings; null reads as `None`.
fn string_list(field: &str, value: &Value) -> Result<Option<Vec<String>>, ApiError> {
    let invalid = || {
        ApiError::bad_request(format!(
            "invalid network.{field}: expected a list of strings"
        ))
    };
    match value {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(invalid))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        _ => Err(invalid()),
    }
}

/// Accepts a setting Hearth does not implement only at its default (null or empty).
fn reject_unsupported(name: &str, value: &Value) -> Result<(), ApiError> {
    let is_default = match name {
        "httpsPorts" => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
        "rules" => value.is_null() || value.as_object().is_some_and(|rules| rules.is_empty()),
        "maskRequestHost" | "egressProxy" => value.is_null(),
        _ => false,
    };
    if is_default {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid network.{name}: this Hearth server does not support it"
        )))
    }
}

impl ControlPlane {
    /// Replaces the egress settings of a live sandbox. A running sandbox gets the new rules
    /// before this returns; a paused one gets them when it resumes.
    pub(crate) async fn update_network(
        &self,
        sandbox_id: &SandboxId,
        update: NetworkUpdate,
    ) -> Result<(), ApiError> {
        if let Some(proxy) = &update.egress_proxy {
            reject_unsupported("egressProxy", proxy)?;
        }
        if let Some(rules) = &update.rules {
            reject_unsupported("rules", rules)?;
        }
        let _guard = self.lock_sandbox(sandbox_id).await;
        let record = self.live_sandbox(sandbox_id).await?;
        let settings = NetworkSettings {
            allow_out: update.allow_out.unwrap_or_default(),
            deny_out: update.deny_out.unwrap_or_default(),
            dns_servers: update.dns_servers,
            allow_public_traffic: record.network.allow_public_traffic,
        };
        let policy = settings.egress_policy(update.allow_internet_access)?;

        if record.state == SandboxState::Running {
            match self.runtime().update_network(sandbox_id, policy).await {
                Ok(()) => {}
                Err(RuntimeError::NotFound(_)) => {
                    return Err(crate::sandboxes::sandbox_not_found(sandbox_id))
                }
                Err(err) => {
                    tracing::error!(sandbox_id = %sandbox_id, error = %err, "network update failed");
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "failed to update the network rules of sandbox {sandbox_id}: {err}"
                        ),
                    ));
                }
            }
        }
        let stored = self
            .store()
            .set_sandbox_network(sandbox_id, update.allow_internet_access, &settings)
            .await?;
        if !stored {
            return Err(crate::sandboxes::sandbox_not_found(sandbox_id));
        }
        tracing::info!(sandbox_id = %sandbox_id, "network rules replaced");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn create_network_reads_the_sdk_fields() {
        let value = json!({
            "allowPublicTraffic": false,
            "allowOut": ["example.com", "10.0.0.0/8"],
            "denyOut": ["0.0.0.0/0"],
            "dnsServers": ["198.18.0.2"],
            "maskRequestHost": null,
            "rules": {}
        });
        let settings = parse_create_network(Some(&value)).unwrap();
        assert_eq!(settings.allow_out, ["example.com", "10.0.0.0/8"]);
        assert_eq!(settings.deny_out, ["0.0.0.0/0"]);
        assert_eq!(
            settings.dns_servers.as_deref(),
            Some(&["198.18.0.2".to_owned()][..])
        );
        assert!(settings.requires_traffic_token());
        let policy = settings.egress_policy(None).unwrap();
        assert_eq!(policy.allow_domains.len(), 1);

        let stored = serde_json::to_string(&settings).unwrap();
        assert_eq!(
            serde_json::from_str::<NetworkSettings>(&stored).unwrap(),
            settings
        );
    }

    #[test]
    fn create_network_rejects_bad_input() {
        for (value, phrase) in [
            (json!([]), "expected an object"),
            (json!({"allowOut": "example.com"}), "list of strings"),
            (json!({"allowOut": [1]}), "list of strings"),
            (json!({"allowPublicTraffic": "no"}), "true or false"),
            (
                json!({"maskRequestHost": "x.example.com"}),
                "does not support",
            ),
            (
                json!({"egressProxy": {"address": "127.0.0.1:1080"}}),
                "does not support",
            ),
            (json!({"bogus": true}), "does not support"),
        ] {
            let error = parse_create_network(Some(&value)).unwrap_err();
            assert!(
                error.message().contains(phrase),
                "{value}: {}",
                error.message()
            );
        }
        let settings = parse_create_network(Some(&json!({"denyOut": ["example.com"]}))).unwrap();
        let error = settings.egress_policy(None).unwrap_err();
        assert!(error.message().contains("denyOut"), "{}", error.message());
    }
}
