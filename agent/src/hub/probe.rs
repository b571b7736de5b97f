//! A cheap reachability probe of the hub's port, between the reconnect backoff's long pauses.
//!
//! The backoff grows to minutes (`[hub] reconnect_backoff_max`) so that a fleet does not hammer
//! a hub that is down; but when the route itself was down (the port did not take a TCP
//! connection) and comes back, waiting out those minutes only delays the backlog. So a pause that
//! began with the hub's port unreachable is ended as soon as a TCP connection to it opens again
//! (probed every few seconds, with jitter): the real attempt starts at once. A hub whose port is
//! reachable but that refuses or fails the MQTT connection gets no early attempt: one
//! connection attempt per backoff step either way. (After a CONNACK 3, "server unavailable",
//! there is nothing to probe: the pauses stay short instead, `[hub] unavailable_backoff_max`.)

use std::time::Duration;

use super::HubParams;

/// A pause at least this long is probed; shorter ones are not worth it.
pub(super) const MIN_PAUSE: Duration = Duration::from_secs(4);

/// How long a probe waits for the TCP connection to open.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Where the next connection dials first, when a probe can tell anything: `None` through an HTTP
/// proxy (the proxy answers whether or not the hub can be reached).
pub(super) fn target(params: &HubParams) -> Option<(String, u16)> {
    if params.proxy.is_some() {
        return None;
    }
    let port = params.auto.as_ref().map_or(params.port, |a| a.first_port());
    Some((params.hub.clone(), port))
}

/// True when a TCP connection to `host:port` opens within [`TIMEOUT`]; it is closed at once,
/// before any TLS.
pub(super) async fn reachable(host: &str, port: u16) -> bool {
    matches!(
        tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// The wait before the next probe: 2 to 3 s, jittered so that a fleet's probes spread.
pub(super) fn next_in() -> Duration {
    Duration::from_secs(2) + Duration::from_secs(1).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listening_port_is_reachable_and_a_closed_one_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(reachable("127.0.0.1", port).await);
        drop(listener);
        assert!(!reachable("127.0.0.1", port).await);
    }

    #[test]
    fn probes_are_paced_with_jitter() {
        let waits: Vec<Duration> = (0..50).map(|_| next_in()).collect();
        assert!(
            waits
                .iter()
                .all(|w| *w >= Duration::from_secs(2) && *w <= Duration::from_secs(3))
        );
        assert!(waits.iter().any(|w| *w != waits[0]), "no jitter: {waits:?}");
    }
}
