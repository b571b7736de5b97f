//! Shared pieces of the benchmark binaries: TLS trusting hubsim's CA, SAS tokens, MQTT options.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A rustls client configuration that trusts only `ca_pem` (hubsim's `ca.pem`).
pub fn tls(ca_pem: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading CA file {}", ca_pem.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing {}", ca_pem.display()))?)
            .with_context(|| format!("adding a certificate of {}", ca_pem.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Percent-encoding of Python's `quote(safe="")`, as Azure's SDKs sign.
pub fn url_encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// HMAC-SHA256 of `data` with a base64 key.
pub fn hmac_b64(key_b64: &str, data: &str) -> anyhow::Result<String> {
    let key = B64
        .decode(key_b64.trim())
        .context("the symmetric key is not base64")?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    Ok(B64.encode(ring::hmac::sign(&key, data.as_bytes()).as_ref()))
}

/// A SAS token for `resource`, valid for an hour.
pub fn sas(key_b64: &str, resource: &str, key_name: Option<&str>) -> anyhow::Result<String> {
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let sr = url_encode(resource);
    let sig = hmac_b64(key_b64, &format!("{sr}\n{expiry}"))?;
    let mut token = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        url_encode(&sig)
    );
    if let Some(name) = key_name {
        token.push_str(&format!("&skn={}", url_encode(name)));
    }
    Ok(token)
}

/// One MQTT-over-TLS client (clean session, 256 KiB packets like the hub's limit).
pub fn client(
    tls: &Arc<rustls::ClientConfig>,
    client_id: &str,
    port: u16,
    username: &str,
    password: &str,
    inflight: u16,
) -> (AsyncClient, EventLoop) {
    let mut mqtt = MqttOptions::new(client_id, "localhost", port);
    mqtt.set_keep_alive(Duration::from_secs(60));
    mqtt.set_clean_session(true);
    mqtt.set_inflight(inflight.max(1));
    mqtt.set_max_packet_size(300 * 1024, 300 * 1024);
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls.clone(),
    )));
    mqtt.set_credentials(username, password);
    AsyncClient::new(mqtt, usize::from(inflight.max(1)) * 2)
}

/// `{"seq":N,"pad":"xxx…"}` padded to exactly `size` bytes: the body every publisher sends.
pub fn body(seq: u64, size: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut text = String::with_capacity(size);
    text.push_str(&head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

/// Seconds since the Unix epoch as a float, for timestamps the orchestrator compares.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
