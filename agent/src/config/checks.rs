//! The checks serde cannot make: settings that depend on each other, limits, and the
//! `[[plugin]]` tables, which come out typed. Each error names the dotted key at fault.

use std::collections::BTreeSet;

use super::plugin::PluginSpec;
use super::{
    Attestation, DpsEndpoint, HubSettings, Provisioning, QueueConfig, Source, TpmKeySource,
    check_tpm_handle, valid_model_id, valid_registration_id,
};

/// A setting that parsed but makes no sense (`Config::load` adds the file).
#[derive(Debug)]
pub(super) struct Invalid {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `source = "dps"`: scope, attestation and registration id are there, and the endpoint parses.
pub(super) fn dps_settings(p: &Provisioning, mqtt_port: u16) -> Result<DpsEndpoint, Invalid> {
    if p.id_scope.as_deref().unwrap_or("").is_empty() {
        return Err(invalid(
            "provisioning.id_scope",
            "required when source = \"dps\" (or set PROVISIONING_IDSCOPE)",
        ));
    }
    if p.attestation.is_none() {
        return Err(invalid(
            "provisioning.attestation",
            "required when source = \"dps\": method = \"symmetric_key\", \"x509\" or \"tpm\"",
        ));
    }
    // X.509 takes the id from the certificate CN, TPM attestation from the endorsement key.
    let needs_id = !matches!(
        p.attestation,
        Some(Attestation::X509 { .. })
            | Some(Attestation::Tpm {
                key_source: TpmKeySource::Attestation,
                ..
            })
    );
    if needs_id && p.registration_id.as_deref().unwrap_or("").is_empty() {
        return Err(invalid(
            "provisioning.registration_id",
            "required for symmetric_key and tpm with key_source = \"imported\" (x509 uses the certificate CN, TPM attestation the EK)",
        ));
    }
    if let Some(id) = &p.registration_id
        && !valid_registration_id(id)
    {
        return Err(invalid(
            "provisioning.registration_id",
            format!(
                "'{id}' is not a valid registration id (letters, digits, '-', '.', '_', ':'; at most 128; ends with a letter, digit or '-')"
            ),
        ));
    }
    DpsEndpoint::parse(&p.global_endpoint, p.dps_over_https(), mqtt_port)
        .map_err(|m| invalid("provisioning.global_endpoint", m))
}

/// `model_id`, when set, is a DTMI with a version.
pub(super) fn model_id(p: &Provisioning) -> Result<(), Invalid> {
    match &p.model_id {
        Some(id) if !valid_model_id(id) => Err(invalid(
            "provisioning.model_id",
            format!(
                "'{id}' is not an IoT Plug and Play model id: write a DTMI with a version, e.g. \"dtmi:com:example:Gateway;1\" (segments of letters, digits and '_', not starting with a digit; at most 128 characters)"
            ),
        )),
        _ if p
            .payload
            .as_ref()
            .is_some_and(|t| t.contains_key("modelId"))
            && p.model_id.is_some() =>
        {
            Err(invalid(
                "provisioning.payload.modelId",
                "set the model id once, in provisioning.model_id (it is added to the payload)",
            ))
        }
        _ => Ok(()),
    }
}

/// `[provisioning.issued_certificate]`: DPS issues it (any onboarding attestation), its key is
/// kept where the build can keep it, and it is renewed at a fraction of its lifetime strictly
/// between 0 and 1.
pub(super) fn issued_certificate(p: &Provisioning) -> Result<(), Invalid> {
    let Some(issued) = &p.issued_certificate else {
        return Ok(());
    };
    if p.source == Source::Manual {
        return Err(invalid(
            "provisioning.issued_certificate",
            "certificates are issued by DPS: it needs source = \"dps\"",
        ));
    }
    let in_tpm = p.issued_key_store() == Some(super::IssuedKeyStore::Tpm);
    if in_tpm && !cfg!(feature = "tpm") {
        return Err(invalid(
            "provisioning.issued_certificate.key",
            "\"tpm\" needs a hubagent built with TPM support (cargo feature `tpm`); use key = \"file\", or install a build with TPM support",
        ));
    }
    if issued.tcti.is_some() && !in_tpm {
        return Err(invalid(
            "provisioning.issued_certificate.tcti",
            "names the TPM that keeps the key: it goes with key = \"tpm\"",
        ));
    }
    if !(issued.renew_at > 0.0 && issued.renew_at < 1.0) {
        return Err(invalid(
            "provisioning.issued_certificate.renew_at",
            format!(
                "{} is not a fraction of the certificate's lifetime between 0 and 1 (e.g. 0.8: renew after 80 %)",
                issued.renew_at
            ),
        ));
    }
    Ok(())
}

/// `source = "manual"`: a connection string, or hub + device + attestation.
pub(super) fn manual_settings(p: &Provisioning) -> Result<(), Invalid> {
    let by_parts = p.iothub_hostname.is_some() && p.device_id.is_some();
    if p.connection_string.is_none() && !by_parts {
        return Err(invalid(
            "provisioning",
            "source = \"manual\" needs connection_string, or iothub_hostname + device_id + attestation",
        ));
    }
    if by_parts && p.attestation.is_none() && p.connection_string.is_none() {
        return Err(invalid(
            "provisioning.attestation",
            "source = \"manual\" with iothub_hostname needs an attestation (the device key)",
        ));
    }
    Ok(())
}

/// A symmetric key comes from exactly one of key and group_key; a TPM key sits at a usable handle.
pub(super) fn key_sources(p: &Provisioning) -> Result<(), Invalid> {
    match &p.attestation {
        Some(Attestation::SymmetricKey {
            key: None,
            group_key: None,
            ..
        }) => Err(invalid(
            "provisioning.attestation",
            "symmetric_key needs key = { file = ... } or group_key = { file = ... }",
        )),
        Some(Attestation::SymmetricKey {
            key: Some(_),
            group_key: Some(_),
            ..
        }) => Err(invalid(
            "provisioning.attestation",
            "give either key or group_key, not both",
        )),
        Some(Attestation::Tpm { handle, .. }) => {
            check_tpm_handle(*handle).map_err(|m| invalid("provisioning.attestation.handle", m))
        }
        _ => Ok(()),
    }
}

/// The largest MQTT keep-alive IoT Hub honours: the hub closes a connection silent for 1.5 ×
/// keep-alive but never waits longer than 1767 s (the Azure load balancer's idle timeout), so
/// 1767 / 1.5 = 1177 s. Source: Azure's "Communicate with an IoT hub using the MQTT protocol"
/// (MicrosoftDocs/azure-docs, articles/iot/iot-mqtt-connect-to-iot-hub.md, "Default keep-alive
/// timeout"); docs/configuration.md.
pub(super) const MAX_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1177);

/// SAS renewal, keep-alive, queue size, in-flight window and message size within what works.
pub(super) fn hub_and_queue_limits(hub: &HubSettings, queue: &QueueConfig) -> Result<(), Invalid> {
    if hub.keep_alive > MAX_KEEP_ALIVE {
        return Err(invalid(
            "hub.keep_alive",
            format!(
                "{} is above IoT Hub's limit of 1177s: the hub drops connections idle for 1767 s (1.5 × keep-alive, capped), so a longer keep-alive loses the connection between pings",
                humantime::format_duration(hub.keep_alive)
            ),
        ));
    }
    if hub.keep_alive < std::time::Duration::from_secs(1) {
        return Err(invalid(
            "hub.keep_alive",
            "must be at least 1s (MQTT counts keep-alive in whole seconds; 0 would turn pings off and the hub drops idle connections after 1767 s)",
        ));
    }
    if hub.renew_before >= hub.sas_ttl {
        return Err(invalid(
            "hub.renew_before",
            "must be shorter than hub.sas_ttl",
        ));
    }
    if queue.max_bytes < 64 * 1024 {
        return Err(invalid("queue.max_bytes", "must be at least 64KiB"));
    }
    if hub.inflight == 0 {
        return Err(invalid("hub.inflight", "must be at least 1"));
    }
    if hub.max_message_size > 256 * 1024 {
        return Err(invalid(
            "hub.max_message_size",
            "IoT Hub accepts at most 256KiB per message",
        ));
    }
    Ok(())
}

/// Each `[[plugin]]` table as a spec; names are unique. Errors name `plugin[i].name` or
/// `plugin[i] (name).key`.
pub(super) fn plugin_specs(tables: &[toml::Table]) -> Result<Vec<PluginSpec>, Invalid> {
    let mut names = BTreeSet::new();
    let mut specs = Vec::with_capacity(tables.len());
    for (i, table) in tables.iter().enumerate() {
        let name = table.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
            invalid(
                format!("plugin[{i}].name"),
                "every [[plugin]] needs name = \"...\" (a string)",
            )
        })?;
        if !names.insert(name.to_string()) {
            return Err(invalid(
                format!("plugin[{i}].name"),
                format!("plugin name '{name}' is used twice"),
            ));
        }
        let spec = PluginSpec::from_table(table)
            .map_err(|(key, message)| invalid(format!("plugin[{i}] ({name}).{key}"), message))?;
        specs.push(spec);
    }
    Ok(specs)
}
