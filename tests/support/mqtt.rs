//! hubsim's own tests talk to it as devices and services do, without the agent: SAS tokens as
//! Azure's SDKs build them, raw rumqttc clients and an HTTPS client that trust hubsim's CA.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;

use serde_json::Value;

use crate::WAIT;

/// `SharedAccessSignature sr=…&sig=…&se=…` as Azure's SDKs build it.
pub fn sas_token(key_b64: &str, resource: &str, expiry: u64, key_name: Option<&str>) -> String {
    let key = B64.decode(key_b64).unwrap();
    let encoded: String =
        percent_encoding::utf8_percent_encode(resource, percent_encoding::NON_ALPHANUMERIC)
            .collect();
    let to_sign = format!("{encoded}\n{expiry}");
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        to_sign.as_bytes(),
    );
    let sig: String = percent_encoding::utf8_percent_encode(
        &B64.encode(tag.as_ref()),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .collect();
    let mut token = format!("SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str(&format!("&skn={name}"));
    }
    token
}

pub fn in_an_hour() -> u64 {
    hubsim::auth::unix_now() + 3600
}

fn tls_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// An MQTT client over TLS to hubsim's DPS endpoint (`localhost` on the MQTT port).
pub fn mqtt_client(
    running: &hubsim::Running,
    client_id: &str,
    username: &str,
    password: &str,
) -> (AsyncClient, EventLoop) {
    mqtt_client_at(running, "localhost", client_id, username, password)
}

/// An MQTT client over TLS to `host` on hubsim's MQTT port (DPS's `localhost`, or a hub's host:
/// each is its own, as on Azure).
pub fn mqtt_client_at(
    running: &hubsim::Running,
    host: &str,
    client_id: &str,
    username: &str,
    password: &str,
) -> (AsyncClient, EventLoop) {
    AsyncClient::new(
        mqtt_options_at(running, host, client_id, username, password),
        16,
    )
}

/// The options [`mqtt_client_at`] connects with, for a test that changes some (manual acks).
pub fn mqtt_options_at(
    running: &hubsim::Running,
    host: &str,
    client_id: &str,
    username: &str,
    password: &str,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, running.mqtt_addr.port());
    options.set_credentials(username, password);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(600 * 1024, 600 * 1024);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_client(&running.ca_pem),
    )));
    options
}

/// The CONNECT username and SAS password of `device_id` in `hub`, as Azure's SDKs build them.
pub fn hub_credentials(hub: &str, device_id: &str, key: &str, expiry: u64) -> (String, String) {
    (
        format!("{hub}/{device_id}/?api-version=2021-04-12"),
        sas_token(key, &format!("{hub}/devices/{device_id}"), expiry, None),
    )
}

/// A hub device's MQTT client: `device_id` in the first linked hub, dialling that hub's host and
/// signing with `key` a token that expires at `expiry` (unix seconds).
pub fn hub_client(
    running: &hubsim::Running,
    device_id: &str,
    key: &str,
    expiry: u64,
) -> (AsyncClient, EventLoop) {
    let hub = &running.sim.config.hubs[0];
    let (username, password) = hub_credentials(hub, device_id, key, expiry);
    mqtt_client_at(running, hub, device_id, &username, &password)
}

/// Polls the event loop until `pick` returns something, failing on a connection error; gives up
/// after [`WAIT`].
pub async fn until<T>(
    eventloop: &mut EventLoop,
    mut pick: impl FnMut(&Packet) -> Option<T>,
) -> Result<T, rumqttc::ConnectionError> {
    let fut = async {
        loop {
            if let Event::Incoming(packet) = eventloop.poll().await?
                && let Some(found) = pick(&packet)
            {
                return Ok(found);
            }
        }
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("timed out waiting for a packet")
}

/// An HTTPS client that trusts hubsim's CA and returns 4xx/5xx as responses, not errors.
pub fn https_agent(ca_pem: &str) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let certs: Vec<Certificate<'static>> =
        rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .map(|c| Certificate::from_der(c.unwrap().as_ref()).to_owned())
            .collect();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&certs))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .build(),
    )
}

/// The `Authorization` header for the management API, from a connection string.
pub fn service_sas(connection_string: &str) -> String {
    let field = |name: &str| {
        connection_string
            .split(';')
            .find_map(|p| p.strip_prefix(name))
            .unwrap()
            .to_string()
    };
    sas_token(
        &field("SharedAccessKey="),
        &field("HostName="),
        in_an_hour(),
        Some(&field("SharedAccessKeyName=")),
    )
}

/// `https://localhost:<hubsim's HTTPS port><path>`
pub fn url(running: &hubsim::Running, path: &str) -> String {
    format!("https://localhost:{}{path}", running.https_addr.port())
}

/// Which service connection string signs a management call.
#[derive(Debug, Clone, Copy)]
pub enum ServicePolicy {
    /// `iothubowner`: devices, twins, methods.
    Hub,
    /// `provisioningserviceowner`: enrollments and enrollment groups.
    Dps,
}

/// One management-API call as an operator makes it (`GET`, or `PUT` of `body`, with `If-Match`
/// when given): (status, JSON answer or null). Runs off the async runtime.
pub async fn service_call(
    running: &hubsim::Running,
    policy: ServicePolicy,
    path: &str,
    body: Option<Value>,
    if_match: Option<&str>,
) -> (u16, Value) {
    let agent = https_agent(&running.ca_pem);
    let auth = service_sas(match policy {
        ServicePolicy::Hub => &running.hub_connection_string,
        ServicePolicy::Dps => &running.dps_connection_string,
    });
    let url = url(running, path);
    let if_match = if_match.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let response = match body {
            Some(body) => {
                let mut request = agent.put(&url).header("Authorization", &auth);
                if let Some(etag) = &if_match {
                    request = request.header("If-Match", etag);
                }
                request.send_json(&body)
            }
            None => agent.get(&url).header("Authorization", &auth).call(),
        }
        .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().read_json().unwrap_or(Value::Null),
        )
    })
    .await
    .unwrap()
}
