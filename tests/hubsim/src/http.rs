//! The HTTPS listener: DPS device API, management API (shaped like Azure's service REST APIs) and
//! the sim-only endpoints of docs/hubsim.md.
//! OWNER: hubsim-http helper.

use std::sync::Arc;

use crate::state::Sim;

/// Serves HTTPS on `listener` until the task is dropped/aborted.
pub async fn serve(
    _sim: Arc<Sim>,
    _listener: tokio::net::TcpListener,
    _tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<()> {
    todo!("hubsim-http helper")
}
