//! The HTTPS listener: DPS device API, management API (shaped like Azure's service REST APIs) and
//! the sim-only endpoints of docs/hubsim.md.

// Helpers return the finished error `Response` as their `Err`, which handlers send as is; boxing
// it would only add noise on a path that is not hot.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use crate::dps::{self, DeviceCredential, DpsResponse, error_body};
use crate::state::{
    Attestation, C2dMessage, ConnCommand, Device, DeviceAuthentication, EnrollmentGroup,
    IndividualEnrollment, Sim, SlowAssignment, Status, Store, SymmetricKeyPair, ThrottledRequests,
    now_rfc3339, random_key,
};
use crate::twin::{self, MethodError, TwinError};

/// Largest request body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// The TLS client certificate chain of the connection (DER, leaf first), for X.509 over HTTPS.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Vec<Vec<u8>>);

type AppState = Arc<Sim>;

/// Which host (DPS, hubs) a connection reached, and from where: MQTT over WebSockets serves what
/// port 8883 of the same address serves.
#[derive(Debug, Clone)]
pub struct Reached {
    pub endpoint: crate::mqtt::Endpoint,
    pub peer: std::net::SocketAddr,
}

/// MQTT over WebSockets, as DPS and IoT Hub offer it on 443: `GET /$iothub/websocket` upgraded
/// with the subprotocol `mqtt`, MQTT packets in binary messages (docs/hubsim.md, "MQTT over
/// WebSockets", cites Azure). The same MQTT code as port 8883 serves it, with the client
/// certificate of the TLS connection for X.509 devices.
async fn mqtt_over_websocket(
    State(sim): State<AppState>,
    Extension(reached): Extension<Reached>,
    Extension(peer_certificates): Extension<PeerCertificates>,
    headers: HeaderMap,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let offers_mqtt = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
    if !offers_mqtt {
        return fail(
            StatusCode::BAD_REQUEST,
            400000,
            "MQTT over WebSockets needs the WebSocket subprotocol 'mqtt' (Sec-WebSocket-Protocol: mqtt)",
        );
    }
    upgrade
        .protocols(["mqtt"])
        .on_upgrade(move |socket| async move {
            let (mqtt_side, bridge_side) = tokio::io::duplex(64 * 1024);
            let bridge = tokio::spawn(crate::websocket::bridge(socket, bridge_side));
            if let Err(reason) = crate::mqtt::serve_stream(
                sim,
                Box::new(mqtt_side),
                crate::mqtt::Over::WebSocket,
                peer_certificates.0,
                reached.peer,
                reached.endpoint,
            )
            .await
            {
                tracing::debug!(peer = %reached.peer, "mqtt over websocket ended: {reason}");
            }
            // The MQTT end is closed now: the bridge sends what is left (a refusing CONNACK) and ends.
            let _ = bridge.await;
        })
}

/// Every route, without TLS (tests drive it directly with `tower::ServiceExt::oneshot`).
pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/{scope}/registrations/{reg}/register", put(dps_register))
        .route(
            "/{scope}/registrations/{reg}/operations/{op}",
            get(dps_operation),
        )
        .route(
            "/enrollments/{id}",
            put(put_enrollment)
                .get(get_enrollment)
                .delete(delete_enrollment),
        )
        .route(
            "/enrollmentGroups/{id}",
            put(put_group).get(get_group).delete(delete_group),
        )
        .route("/registrations/{id}", get(get_registration))
        .route("/devices", get(list_devices))
        .route(
            "/devices/{id}",
            put(put_device).get(get_device).delete(delete_device),
        )
        .route("/twins/{id}", get(get_twin).patch(patch_twin).put(put_twin))
        .route("/twins/{id}/methods", post(invoke_method))
        .route("/messages/deviceBound/{id}", post(send_c2d))
        .route("/$iothub/websocket", get(mqtt_over_websocket))
        .route("/sim/status", get(sim_status))
        .route(
            "/sim/telemetry/{id}",
            get(get_telemetry).delete(clear_telemetry),
        )
        .route("/sim/c2d/{id}", get(get_c2d))
        .route("/sim/registrations", get(sim_registrations))
        .route("/sim/connections", get(sim_connections))
        .route("/sim/faults/drop/{id}", post(drop_device))
        .route("/sim/faults", post(set_faults).delete(clear_faults))
        .fallback(|| async { fail(StatusCode::NOT_FOUND, 404000, "no such endpoint") })
        .with_state(sim)
}

/// Serves HTTPS on `listener` until the task is dropped/aborted.
pub async fn serve(
    sim: Arc<Sim>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    topology: Arc<crate::mqtt::Topology>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(sim);
    // As for MQTT: connections end with the listener.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("https accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let Ok(local) = tcp.local_addr() else {
            continue;
        };
        let reached = Reached {
            endpoint: topology.at(local.ip()),
            peer,
        };
        connections.spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "https handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let chain = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.to_vec()).collect())
                .unwrap_or_default();
            let app = app
                .layer(Extension(PeerCertificates(chain)))
                .layer(Extension(reached));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                // MQTT over WebSockets takes the connection over after its upgrade.
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, "https connection ended: {e}");
            }
        });
    }
}

fn fail(status: StatusCode, code: u32, message: &str) -> Response {
    let mut response = (status, axum::Json(error_body(code, message))).into_response();
    if let Ok(v) = HeaderValue::from_str(&code.to_string()) {
        response.headers_mut().insert("x-ms-error-code", v);
    }
    response
}

fn ok(value: impl serde::Serialize) -> Response {
    axum::Json(value).into_response()
}

fn parse_json(body: &Bytes) -> Result<Value, Response> {
    if body.len() > MAX_BODY {
        return Err(fail(
            StatusCode::PAYLOAD_TOO_LARGE,
            413000,
            &format!("request body of {} bytes exceeds {MAX_BODY}", body.len()),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!("request body is not valid JSON: {e}"),
        )
    })
}

/// Which service policy a management path belongs to.
#[derive(Clone, Copy)]
enum Policy {
    Hub,
    Dps,
    Either,
}

/// Checks `Authorization: SharedAccessSignature …` against the service policy keys.
fn authorize(sim: &Sim, headers: &HeaderMap, policy: Policy) -> Result<(), Response> {
    let unauthorized = |why: &str| fail(StatusCode::UNAUTHORIZED, 401002, why);
    let header = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| unauthorized("missing Authorization header with a SharedAccessSignature"))?;
    let token = crate::auth::parse_sas(header).map_err(|e| unauthorized(&e.to_string()))?;
    let (hub_key, dps_key) = sim.read(|s| (s.hub_owner_key.clone(), s.dps_owner_key.clone()));
    let mut candidates = Vec::new();
    if matches!(policy, Policy::Hub | Policy::Either) {
        candidates.push(("iothubowner", hub_key, sim.config.hubs.clone()));
    }
    if matches!(policy, Policy::Dps | Policy::Either) {
        candidates.push((
            "provisioningserviceowner",
            dps_key,
            vec![crate::DPS_SERVICE_HOST.to_string()],
        ));
    }
    let now = crate::auth::unix_now();
    for (name, key, hosts) in candidates {
        if token.key_name.as_deref() == Some(name)
            && crate::auth::verify_sas(&token, &key, &token.resource, now).is_ok()
        {
            // As the services do: the token's resource must be this service's host name
            // (optionally followed by a path).
            // Service SDKs pointed at hubsim's HTTPS port put it in their HostName, and so in
            // `sr`: `host:port` names the host too when the port is hubsim's.
            let host = token.resource.split('/').next().unwrap_or_default();
            let port = format!(":{}", sim.config.https_port);
            let host = host.strip_suffix(port.as_str()).unwrap_or(host);
            if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                return Err(unauthorized(&format!(
                    "the SAS token is for '{}', not for this service's host ({}) with policy {name}",
                    token.resource,
                    hosts.join(" or ")
                )));
            }
            return Ok(());
        }
    }
    Err(unauthorized(
        "the SAS token is not signed by a policy allowed here, or it expired",
    ))
}

macro_rules! authorized {
    ($sim:expr, $headers:expr, $policy:expr) => {
        if let Err(response) = authorize(&$sim, &$headers, $policy) {
            return response;
        }
    };
}

// --------------------------------------------------------------------------------------------
// DPS device API
// --------------------------------------------------------------------------------------------

fn device_credential(headers: &HeaderMap, peer: &PeerCertificates) -> DeviceCredential {
    match headers.get("authorization").and_then(|h| h.to_str().ok()) {
        Some(token) if !token.is_empty() => DeviceCredential::Sas(token.to_string()),
        _ if !peer.0.is_empty() => DeviceCredential::X509(peer.0.clone()),
        _ => DeviceCredential::None,
    }
}

fn dps_answer(response: DpsResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = (status, axum::Json(response.body)).into_response();
    if let Some(seconds) = response.retry_after
        && let Ok(v) = HeaderValue::from_str(&seconds.to_string())
    {
        out.headers_mut().insert("retry-after", v);
    }
    out
}

async fn dps_register(
    State(sim): State<AppState>,
    Path((scope, reg)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    peer: Option<Extension<PeerCertificates>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer = peer.map(|Extension(p)| p).unwrap_or_default();
    let credential = device_credential(&headers, &peer);
    // TPM attestation starts without credentials: the answer is the challenge.
    if matches!(credential, DeviceCredential::None) && is_tpm_registration(&body) {
        return dps_answer(dps::tpm_challenge(&sim, &scope, &reg, &body));
    }
    if let Err(reason) = dps::authenticate(&sim, &scope, &reg, &credential) {
        return fail(StatusCode::UNAUTHORIZED, 401002, &reason);
    }
    // The api-version of the query, as the MQTT username carries it: a csr needs the preview's.
    let response = dps::register_at_version(
        &sim,
        &scope,
        &reg,
        &credential,
        &body,
        ("https", query.get("api-version").map(String::as_str)),
    );
    dps_answer(dps::once_synced(&sim, response).await)
}

fn is_tpm_registration(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("tpm").is_some_and(Value::is_object))
}

async fn dps_operation(
    State(sim): State<AppState>,
    Path((scope, reg, op)): Path<(String, String, String)>,
    peer: Option<Extension<PeerCertificates>>,
    headers: HeaderMap,
) -> Response {
    let peer = peer.map(|Extension(p)| p).unwrap_or_default();
    let credential = device_credential(&headers, &peer);
    if let Err(reason) = dps::authenticate(&sim, &scope, &reg, &credential) {
        return fail(StatusCode::UNAUTHORIZED, 401002, &reason);
    }
    dps_answer(dps::operation_status(&sim, &scope, &reg, &op))
}

// --------------------------------------------------------------------------------------------
// DPS service API: enrollments and enrollment groups
// --------------------------------------------------------------------------------------------

/// Fills what Azure fills on create: generated keys, timestamps, etag.
fn complete_common(common: &mut crate::state::EnrollmentCommon, created: Option<String>) {
    if let Attestation::SymmetricKey { symmetric_key } = &mut common.attestation {
        if symmetric_key.primary_key.is_empty() {
            symmetric_key.primary_key = random_key();
        }
        if symmetric_key.secondary_key.is_empty() {
            symmetric_key.secondary_key = random_key();
        }
    }
    let now = now_rfc3339();
    common.created_date_time_utc = Some(created.unwrap_or_else(|| now.clone()));
    common.last_updated_date_time_utc = Some(now);
    common.etag = Some(format!("\"{}\"", uuid::Uuid::new_v4()));
}

/// An update naming (`If-Match`) another version of the enrollment than the stored one: 412, as
/// DPS answers (`az iot dps enrollment update --etag`); `*` or no header replaces any version.
fn stale_enrollment(
    headers: &HeaderMap,
    current: Option<&crate::state::EnrollmentCommon>,
) -> Option<Response> {
    let wanted = if_match(headers).filter(|w| w != "*")?;
    let stored = current.and_then(|c| c.etag.as_deref()).unwrap_or("");
    (stored.trim_matches('"') != wanted).then(|| {
        fail(
            StatusCode::PRECONDITION_FAILED,
            412002,
            &format!("etag '{wanted}' does not match the enrollment's current etag"),
        )
    })
}

/// Azure lets clients omit the keys of a symmetric-key attestation (they are generated).
fn with_default_keys(mut body: Value) -> Value {
    if let Some(att) = body.get_mut("attestation")
        && att.get("type").and_then(Value::as_str) == Some("symmetricKey")
    {
        let keys = att
            .as_object_mut()
            .map(|a| a.entry("symmetricKey").or_insert_with(|| json!({})));
        if let Some(Value::Object(keys)) = keys {
            keys.entry("primaryKey").or_insert_with(|| json!(""));
            keys.entry("secondaryKey").or_insert_with(|| json!(""));
        }
    }
    body
}

fn bad_field(e: serde_json::Error) -> Response {
    fail(
        StatusCode::BAD_REQUEST,
        400004,
        &format!("invalid request body: {e}"),
    )
}

async fn put_enrollment(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    let value = match parse_json(&body) {
        Ok(v) => with_default_keys(v),
        Err(r) => return r,
    };
    let mut enrollment: IndividualEnrollment = match serde_json::from_value(value) {
        Ok(e) => e,
        Err(e) => return bad_field(e),
    };
    if let Attestation::Tpm { tpm } = &enrollment.common.attestation {
        use base64::Engine;
        let check = |field: &str, b64: &str| -> Result<(), Response> {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| "not base64".to_string())
                .and_then(|der| {
                    crate::tpm::parse_rsa_public(&der)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| {
                    fail(
                        StatusCode::BAD_REQUEST,
                        400004,
                        &format!("attestation.tpm.{field}: {e}"),
                    )
                })
        };
        if let Err(r) = check("endorsementKey", &tpm.endorsement_key) {
            return r;
        }
        if let Some(srk) = &tpm.storage_root_key
            && let Err(r) = check("storageRootKey", srk)
        {
            return r;
        }
    }
    if let Err(why) = crate::state::check_registration_id(&enrollment.registration_id) {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!(
                "registrationId '{}' is not valid: {why}",
                enrollment.registration_id
            ),
        );
    }
    if let Some(device_id) = &enrollment.device_id
        && let Err(why) = crate::state::check_device_id(device_id)
    {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!("deviceId '{device_id}' is not valid: {why}"),
        );
    }
    if !enrollment.registration_id.eq_ignore_ascii_case(&id) {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!(
                "registrationId '{}' in the body differs from '{id}' in the path",
                enrollment.registration_id
            ),
        );
    }
    let key = id.to_ascii_lowercase();
    let current = sim.read(|s| s.enrollments.get(&key).map(|e| e.common.clone()));
    if let Some(r) = stale_enrollment(&headers, current.as_ref()) {
        return r;
    }
    let created = current.and_then(|c| c.created_date_time_utc);
    complete_common(&mut enrollment.common, created);
    let stored = enrollment.clone();
    match sim.mutate(|s| s.enrollments.insert(key, stored)) {
        Ok(_) => ok(enrollment),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string()),
    }
}

async fn get_enrollment(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    match sim.read(|s| s.enrollments.get(&id.to_ascii_lowercase()).cloned()) {
        Some(e) => ok(e),
        None => fail(
            StatusCode::NOT_FOUND,
            404201,
            &format!("enrollment '{id}' not found"),
        ),
    }
}

async fn delete_enrollment(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    match sim.mutate(|s| s.enrollments.remove(&id.to_ascii_lowercase())) {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => fail(
            StatusCode::NOT_FOUND,
            404201,
            &format!("enrollment '{id}' not found"),
        ),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string()),
    }
}

async fn put_group(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    let value = match parse_json(&body) {
        Ok(v) => with_default_keys(v),
        Err(r) => return r,
    };
    let mut group: EnrollmentGroup = match serde_json::from_value(value) {
        Ok(g) => g,
        Err(e) => return bad_field(e),
    };
    if let Err(why) = crate::state::check_registration_id(&group.enrollment_group_id) {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!(
                "enrollmentGroupId '{}' is not valid: {why}",
                group.enrollment_group_id
            ),
        );
    }
    if group.enrollment_group_id != id {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!(
                "enrollmentGroupId '{}' in the body differs from '{id}' in the path",
                group.enrollment_group_id
            ),
        );
    }
    if let Attestation::X509 { x509 } = &group.common.attestation
        && dps::signing_certificates(&group.common).is_empty()
    {
        let _ = x509;
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            "an X.509 enrollment group needs x509.signingCertificates.primary.certificate (PEM or base64 DER)",
        );
    }
    let current = sim.read(|s| s.groups.get(&id).map(|g| g.common.clone()));
    if let Some(r) = stale_enrollment(&headers, current.as_ref()) {
        return r;
    }
    let created = current.and_then(|c| c.created_date_time_utc);
    complete_common(&mut group.common, created);
    let stored = group.clone();
    match sim.mutate(|s| s.groups.insert(id, stored)) {
        Ok(_) => ok(group),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string()),
    }
}

async fn get_group(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    match sim.read(|s| s.groups.get(&id).cloned()) {
        Some(g) => ok(g),
        None => fail(
            StatusCode::NOT_FOUND,
            404202,
            &format!("enrollment group '{id}' not found"),
        ),
    }
}

async fn delete_group(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    match sim.mutate(|s| s.groups.remove(&id)) {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => fail(
            StatusCode::NOT_FOUND,
            404202,
            &format!("enrollment group '{id}' not found"),
        ),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string()),
    }
}

async fn get_registration(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Dps);
    match sim.read(|s| s.registrations.get(&id.to_ascii_lowercase()).cloned()) {
        Some(r) => ok(r.state),
        None => fail(
            StatusCode::NOT_FOUND,
            404203,
            &format!("no registration for '{id}'"),
        ),
    }
}

// --------------------------------------------------------------------------------------------
// IoT Hub service API: devices, twins, methods, C2D
// --------------------------------------------------------------------------------------------

/// Management paths name a device but not its hub: the first hub that has it.
fn find_device(sim: &Sim, device_id: &str) -> Option<(String, Device)> {
    sim.read(|s| {
        s.devices
            .iter()
            .find(|(_, d)| d.device_id == device_id)
            .map(|(k, d)| (k.clone(), d.clone()))
    })
}

fn device_json(sim: &Sim, key: &str, device: &Device) -> Value {
    let connected = sim.live.lock().unwrap().connections.contains_key(key);
    json!({
        "deviceId": device.device_id,
        "generationId": device.generation_id,
        "etag": device.etag,
        "status": device.status,
        "authentication": device.authentication,
        "connectionState": if connected { "Connected" } else { "Disconnected" },
        "hub": device.hub,
        "modelId": device.model_id.clone().unwrap_or_default(),
    })
}

fn twin_json(device: &Device) -> Value {
    let mut desired = device.twin.desired.clone();
    desired.insert("$version".into(), json!(device.twin.desired_version));
    let mut reported = device.twin.reported.clone();
    reported.insert("$version".into(), json!(device.twin.reported_version));
    json!({
        "deviceId": device.device_id,
        "etag": device.etag,
        "version": device.twin.desired_version + device.twin.reported_version + 1,
        "status": device.status,
        "tags": device.twin.tags,
        "properties": {"desired": desired, "reported": reported},
        "modelId": device.model_id.clone().unwrap_or_default(),
    })
}

fn device_not_found(id: &str) -> Response {
    fail(
        StatusCode::NOT_FOUND,
        404001,
        &format!("device '{id}' not found"),
    )
}

async fn list_devices(State(sim): State<AppState>, headers: HeaderMap) -> Response {
    authorized!(sim, headers, Policy::Hub);
    let devices: Vec<(String, Device)> = sim.read(|s| {
        s.devices
            .iter()
            .map(|(k, d)| (k.clone(), d.clone()))
            .collect()
    });
    ok(devices
        .iter()
        .map(|(k, d)| device_json(&sim, k, d))
        .collect::<Vec<_>>())
}

async fn put_device(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    if let Err(why) = crate::state::check_device_id(&id) {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!("deviceId '{id}' is not valid: {why}"),
        );
    }
    let value = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut authentication: DeviceAuthentication = match value
        .get("authentication")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
    {
        Ok(a) => a.unwrap_or(DeviceAuthentication {
            kind: "sas".into(),
            symmetric_key: None,
            x509_thumbprint: None,
        }),
        Err(e) => return bad_field(e),
    };
    if authentication.kind == "sas" {
        let keys = authentication
            .symmetric_key
            .get_or_insert(SymmetricKeyPair {
                primary_key: String::new(),
                secondary_key: String::new(),
            });
        for key in [&mut keys.primary_key, &mut keys.secondary_key] {
            if key.is_empty() {
                *key = random_key();
            }
        }
    }
    let status = match value.get("status").and_then(Value::as_str) {
        Some("disabled") => Status::Disabled,
        _ => Status::Enabled,
    };
    let (key, existing) = match find_device(&sim, &id) {
        Some((k, d)) => (k, Some(d)),
        None => (Store::device_key(&sim.config.hubs[0], &id), None),
    };
    // Updating a device (its keys, say) names the version it replaces, as the hub wants.
    if let Some(existing) = &existing {
        match if_match(&headers) {
            None => {
                return fail(
                    StatusCode::CONFLICT,
                    409001,
                    &format!(
                        "a device with id '{id}' is already registered (an update needs If-Match: its etag or *)"
                    ),
                );
            }
            Some(wanted) if wanted != "*" && wanted != existing.etag => {
                return fail(
                    StatusCode::PRECONDITION_FAILED,
                    412002,
                    &format!("etag '{wanted}' does not match the device's current etag"),
                );
            }
            Some(_) => {}
        }
    }
    let device = Device {
        device_id: id.clone(),
        hub: existing
            .as_ref()
            .map(|d| d.hub.clone())
            .unwrap_or_else(|| sim.config.hubs[0].clone()),
        authentication,
        status,
        generation_id: existing
            .as_ref()
            .map(|d| d.generation_id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        etag: uuid::Uuid::new_v4().to_string(),
        twin: existing
            .as_ref()
            .map(|d| d.twin.clone())
            .unwrap_or_default(),
        model_id: existing.as_ref().and_then(|d| d.model_id.clone()),
        ca_group: existing.and_then(|d| d.ca_group),
    };
    let stored = device.clone();
    if let Err(e) = sim.mutate(|s| s.devices.insert(key.clone(), stored)) {
        return fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string());
    }
    if device.status == Status::Disabled {
        close_connection(&sim, &key, "device disabled");
    }
    ok(device_json(&sim, &key, &device))
}

async fn get_device(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    match find_device(&sim, &id) {
        Some((k, d)) => ok(device_json(&sim, &k, &d)),
        None => device_not_found(&id),
    }
}

async fn delete_device(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    let Some((key, _)) = find_device(&sim, &id) else {
        return device_not_found(&id);
    };
    if let Err(e) = sim.mutate(|s| s.devices.remove(&key)) {
        return fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string());
    }
    close_connection(&sim, &key, "device deleted");
    StatusCode::NO_CONTENT.into_response()
}

fn close_connection(sim: &Sim, key: &str, reason: &str) -> bool {
    match sim.live.lock().unwrap().connections.get(key) {
        Some(conn) => conn
            .tx
            .send(ConnCommand::Close {
                reason: reason.to_string(),
            })
            .is_ok(),
        None => false,
    }
}

async fn get_twin(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    match find_device(&sim, &id) {
        Some((_, d)) => ok(twin_json(&d)),
        None => device_not_found(&id),
    }
}

fn twin_failure(e: TwinError) -> Response {
    match e {
        TwinError::NotFound(id) => device_not_found(&id),
        TwinError::BadPatch(m) => fail(StatusCode::BAD_REQUEST, 400004, &m),
        TwinError::TooLarge(_) => fail(StatusCode::PAYLOAD_TOO_LARGE, 413001, &e.to_string()),
        TwinError::Persist(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string()),
    }
}

/// Applies `{"properties": {"desired": …}, "tags": …}`; `replace` = PUT semantics.
fn update_twin(sim: &Sim, id: &str, body: &Bytes, replace: bool) -> Response {
    let value = match parse_json(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some((key, device)) = find_device(sim, id) else {
        return device_not_found(id);
    };
    if let Some(tags) = value.get("tags") {
        let tags = match twin::validate_patch(tags, "tags") {
            Ok(tags) => tags.clone(),
            Err(e) => return twin_failure(e),
        };
        let mut updated = if replace {
            Default::default()
        } else {
            device.twin.tags.clone()
        };
        for (k, v) in tags {
            if v.is_null() {
                updated.remove(&k);
            } else {
                updated.insert(k, v);
            }
        }
        let size = twin::section_size(&updated);
        if size > twin::MAX_TAGS_BYTES {
            return twin_failure(TwinError::TooLarge(format!(
                "tags would be {size} bytes as the hub counts them; the hub allows at most {}",
                twin::MAX_TAGS_BYTES
            )));
        }
        let result = sim.mutate(|s| {
            if let Some(d) = s.devices.get_mut(&key) {
                d.twin.tags = updated;
            }
        });
        if let Err(e) = result {
            return fail(StatusCode::INTERNAL_SERVER_ERROR, 500000, &e.to_string());
        }
    }
    if let Some(desired) = value.pointer("/properties/desired") {
        let patch = if replace {
            // PUT: every current key not in the new document is deleted.
            let mut patch = desired.as_object().cloned().unwrap_or_default();
            for k in device.twin.desired.keys() {
                patch.entry(k.clone()).or_insert(Value::Null);
            }
            Value::Object(patch)
        } else {
            desired.clone()
        };
        if let Err(e) = twin::apply_desired_patch(sim, &key, &patch) {
            return twin_failure(e);
        }
    }
    match find_device(sim, id) {
        Some((_, d)) => ok(twin_json(&d)),
        None => device_not_found(id),
    }
}

async fn patch_twin(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    if let Some(r) = etag_mismatch(&sim, &id, &headers) {
        return r;
    }
    update_twin(&sim, &id, &body, false)
}

/// The etag an `If-Match` header names (quotes dropped; `*` for any), if the request has one.
fn if_match(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("if-match")?.to_str().ok()?.trim();
    Some(value.trim_matches('"').to_string()).filter(|v| !v.is_empty())
}

/// `If-Match` with a stale etag: 412, as the hub answers an optimistic-concurrency conflict.
fn etag_mismatch(sim: &Sim, id: &str, headers: &HeaderMap) -> Option<Response> {
    let wanted = headers
        .get("if-match")?
        .to_str()
        .ok()?
        .trim()
        .trim_matches('"');
    if wanted == "*" || wanted.is_empty() {
        return None;
    }
    let (_, device) = find_device(sim, id)?;
    (device.etag != wanted).then(|| {
        fail(
            StatusCode::PRECONDITION_FAILED,
            412002,
            &format!("etag '{wanted}' does not match the twin's current etag"),
        )
    })
}

async fn put_twin(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    if let Some(r) = etag_mismatch(&sim, &id, &headers) {
        return r;
    }
    update_twin(&sim, &id, &body, true)
}

async fn invoke_method(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    let value = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(method) = value.get("methodName").and_then(Value::as_str) else {
        return fail(StatusCode::BAD_REQUEST, 400004, "methodName is required");
    };
    let timeout = value
        .get("responseTimeoutInSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30)
        .clamp(1, 300);
    let Some((key, _)) = find_device(&sim, &id) else {
        return device_not_found(&id);
    };
    let payload = value.get("payload").cloned().unwrap_or(Value::Null);
    match twin::invoke_method(&sim, &key, method, &payload, Duration::from_secs(timeout)).await {
        Ok((status, payload)) => ok(json!({"status": status, "payload": payload})),
        Err(MethodError::NotConnected(_)) => fail(
            StatusCode::NOT_FOUND,
            404103,
            &format!("device '{id}' is not online or not subscribed to methods"),
        ),
        Err(MethodError::Timeout) => fail(
            StatusCode::GATEWAY_TIMEOUT,
            504101,
            &format!("device '{id}' did not answer '{method}' within {timeout} s"),
        ),
    }
}

async fn send_c2d(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorized!(sim, headers, Policy::Hub);
    let value = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let text = match value.get("body") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    if text.len() > 64 * 1024 {
        return fail(
            StatusCode::PAYLOAD_TOO_LARGE,
            413002,
            "C2D messages are limited to 64 KiB",
        );
    }
    let mut properties = vec![(
        "$.mid".to_string(),
        value
            .get("messageId")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    )];
    if let Some(ct) = value.get("contentType").and_then(Value::as_str) {
        properties.push(("$.ct".into(), ct.into()));
    }
    if let Some(Value::Object(props)) = value.get("properties") {
        for (k, v) in props {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            properties.push((k.clone(), v));
        }
    }
    let Some((key, _)) = find_device(&sim, &id) else {
        return device_not_found(&id);
    };
    match twin::send_c2d(
        &sim,
        &key,
        C2dMessage {
            body: text.into(),
            properties,
        },
    ) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(TwinError::BadPatch(m)) => fail(StatusCode::FORBIDDEN, 403004, &m),
        Err(e) => twin_failure(e),
    }
}

// --------------------------------------------------------------------------------------------
// Simulator-only endpoints
// --------------------------------------------------------------------------------------------

async fn sim_status(State(sim): State<AppState>, headers: HeaderMap) -> Response {
    authorized!(sim, headers, Policy::Either);
    let (enrollments, groups, devices, scope) = sim.read(|s| {
        (
            s.enrollments.len(),
            s.groups.len(),
            s.devices.len(),
            s.id_scope.clone(),
        )
    });
    let connected = sim.live.lock().unwrap().connections.len();
    let (received, readings, blocks) = {
        let r = sim.records.lock().unwrap();
        (
            r.telemetry_received.clone(),
            r.readings_received.clone(),
            r.billed_blocks.clone(),
        )
    };
    let blocks_total: u64 = blocks.values().sum();
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "idScope": scope,
        "extraIdScopes": sim.config.extra_id_scopes,
        "hubs": sim.config.hubs,
        "mqttPort": sim.config.mqtt_port,
        "httpsPort": sim.config.https_port,
        "enrollments": enrollments,
        "enrollmentGroups": groups,
        "devices": devices,
        "connectedDevices": connected,
        "telemetryReceived": received,
        "readingsReceived": readings,
        "billedBlocks": blocks,
        "billedBlocksTotal": blocks_total,
    }))
}

async fn get_telemetry(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Either);
    let records = sim
        .records
        .lock()
        .unwrap()
        .telemetry
        .get(&id)
        .cloned()
        .unwrap_or_default();
    ok(records)
}

async fn clear_telemetry(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Either);
    sim.records.lock().unwrap().telemetry.remove(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// Every C2D message sent to a device: its id, state (enqueued / invisible / completed) and how
/// many times it was delivered.
async fn get_c2d(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Either);
    let Some((key, _)) = find_device(&sim, &id) else {
        return device_not_found(&id);
    };
    ok(sim.c2d_records(&key))
}

async fn sim_registrations(State(sim): State<AppState>, headers: HeaderMap) -> Response {
    authorized!(sim, headers, Policy::Either);
    ok(sim.records.lock().unwrap().registrations.clone())
}

async fn sim_connections(State(sim): State<AppState>, headers: HeaderMap) -> Response {
    authorized!(sim, headers, Policy::Either);
    ok(sim.records.lock().unwrap().connections.clone())
}

async fn drop_device(
    State(sim): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    authorized!(sim, headers, Policy::Either);
    let keys: Vec<String> = sim
        .live
        .lock()
        .unwrap()
        .connections
        .keys()
        .filter(|k| k.split_once('/').is_some_and(|(_, d)| d == id))
        .cloned()
        .collect();
    let dropped = keys
        .iter()
        .filter(|k| close_connection(&sim, k, "dropped by fault injection"))
        .count();
    ok(json!({"dropped": dropped}))
}

async fn set_faults(State(sim): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    authorized!(sim, headers, Policy::Either);
    let value = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(map) = value.as_object() else {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            "faults must be a JSON object",
        );
    };
    let known = [
        "refuseConnectionsSeconds",
        "dpsThrottle",
        "dpsAssigning",
        "delayMs",
        "tokenLifetimeSeconds",
        "twinThrottle",
        "issuanceFailures",
    ];
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return fail(
            StatusCode::BAD_REQUEST,
            400004,
            &format!("unknown fault '{unknown}' (known: {})", known.join(", ")),
        );
    }
    let number = |name: &str| -> Result<Option<u64>, Response> {
        match map.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                fail(
                    StatusCode::BAD_REQUEST,
                    400004,
                    &format!("{name} must be a non-negative integer"),
                )
            }),
        }
    };
    let refuse = match number("refuseConnectionsSeconds") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let delay = match number("delayMs") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let lifetime = match number("tokenLifetimeSeconds") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let twin_throttle = match number("twinThrottle") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let issuance_failures = match number("issuanceFailures") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let throttle = match map.get("dpsThrottle") {
        None => None,
        Some(t) => match (
            t.get("count").and_then(Value::as_u64),
            t.get("retryAfter").and_then(Value::as_u64),
            t.get("requests").map(Value::as_str),
        ) {
            (Some(count), Some(retry), requests) => {
                let requests = match requests {
                    None | Some(Some("any")) => ThrottledRequests::Any,
                    Some(Some("register")) => ThrottledRequests::Register,
                    Some(Some("poll")) => ThrottledRequests::Poll,
                    Some(_) => {
                        return fail(
                            StatusCode::BAD_REQUEST,
                            400004,
                            &format!(
                                "dpsThrottle.requests must be \"any\", \"register\" or \"poll\", got {}",
                                t["requests"]
                            ),
                        );
                    }
                };
                Some((count.min(u64::from(u32::MAX)) as u32, retry, requests))
            }
            _ => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    400004,
                    "dpsThrottle needs integer 'count' and 'retryAfter' (and optionally 'requests')",
                );
            }
        },
    };
    let slow = match map.get("dpsAssigning") {
        None => None,
        Some(a) => {
            let polls = a.get("polls").and_then(Value::as_u64);
            let retry_after = a.get("retryAfter").map(Value::as_u64);
            match (polls, retry_after) {
                (Some(polls), None | Some(Some(_))) => Some(SlowAssignment {
                    polls: polls.min(u64::from(u32::MAX)) as u32,
                    retry_after: retry_after.flatten(),
                }),
                _ => {
                    return fail(
                        StatusCode::BAD_REQUEST,
                        400004,
                        "dpsAssigning needs an integer 'polls' (and optionally an integer 'retryAfter')",
                    );
                }
            }
        }
    };
    let mut faults = sim.faults.lock().unwrap();
    if let Some(s) = refuse {
        faults.refuse_connections_until = Some(std::time::Instant::now() + Duration::from_secs(s));
    }
    if let Some(ms) = delay {
        faults.delay = (ms > 0).then(|| Duration::from_millis(ms));
    }
    if let Some(s) = lifetime {
        faults.token_lifetime_cap = (s > 0).then(|| Duration::from_secs(s));
    }
    if let Some((count, retry_after, requests)) = throttle {
        faults.dps_throttle = (count > 0).then_some((count, retry_after));
        faults.dps_throttle_requests = requests;
    }
    if let Some(slow) = slow {
        faults.dps_slow_assignment = (slow.polls > 0).then_some(slow);
    }
    if let Some(count) = twin_throttle {
        faults.twin_throttle = u32::try_from(count).unwrap_or(u32::MAX);
    }
    if let Some(count) = issuance_failures {
        faults.issuance_failures = u32::try_from(count).unwrap_or(u32::MAX);
    }
    drop(faults);
    if refuse.is_some() {
        // Refusing new connections starts by dropping the live ones, as an outage does.
        let keys: Vec<String> = sim
            .live
            .lock()
            .unwrap()
            .connections
            .keys()
            .cloned()
            .collect();
        for key in keys {
            close_connection(&sim, &key, "hub unavailable (fault injection)");
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(State(sim): State<AppState>, headers: HeaderMap) -> Response {
    authorized!(sim, headers, Policy::Either);
    *sim.faults.lock().unwrap() = Default::default();
    StatusCode::NO_CONTENT.into_response()
}
