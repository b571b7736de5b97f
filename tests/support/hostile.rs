//! A hostile hub: a server between the agent and hubsim that, when told to, speaks MQTT badly
//! (one [`Hostile`] behaviour at a time) and otherwise carries the bytes to hubsim unchanged.
//!
//! The agent is configured with this server's port as `[hub] port`; DPS (on `localhost`) and the
//! hub (on its own loopback address) both reach hubsim through it. While it behaves
//! ([`HostileHub::behave`] with `None`) it is a byte pipe, TLS included. A behaviour that needs
//! the hub's real session (a PUBACK sent twice, bytes injected after the CONNACK) terminates TLS
//! with hubsim's own server certificate (so the agent's trust bundle accepts it) and opens a TLS
//! connection of its own to hubsim: the agent cannot tell it from the hub.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the hostile hub does with a new connection.
#[derive(Debug, Clone)]
pub enum Hostile {
    /// Accepts the TCP connection and never reads from it (the TLS handshake never starts).
    NeverReads,
    /// Reads the TLS ClientHello and never answers: a handshake stalled half-way.
    TlsStall,
    /// Completes TLS, reads the CONNECT and never sends a CONNACK.
    NoConnack,
    /// The hub's real session, with `bytes` written to the agent right after the CONNACK; then
    /// `after`.
    Inject { bytes: Vec<u8>, after: After },
    /// The hub's real session, with every PUBACK sent twice.
    DuplicatePuback,
}

/// What follows injected bytes.
#[derive(Debug, Clone, Copy)]
pub enum After {
    /// The session goes on (the hub's packets follow the injected bytes).
    Forward,
    /// Nothing more is sent or read; the connection stays open.
    Stall,
    /// The connection is closed.
    Close,
}

/// Packets to inject, each malformed in one way.
pub mod packets {
    /// A packet of the reserved type 15.
    pub const RESERVED_TYPE: &[u8] = &[0xF0, 0x00];
    /// A PUBLISH whose remaining length says 16 bytes and that brings 2.
    pub const TRUNCATED_PUBLISH: &[u8] = &[0x30, 0x10, 0x00, 0x05];
    /// A PUBLISH announcing 268 435 455 bytes, the most MQTT can say.
    pub const HUGE_LENGTH: &[u8] = &[0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    /// A remaining length of five bytes (MQTT allows four).
    pub const MALFORMED_LENGTH: &[u8] = &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
    /// A PUBACK for packet id 60000, which the agent (at most 32 in flight) never sent.
    pub const PUBACK_NEVER_SENT: &[u8] = &[0x40, 0x02, 0xEA, 0x60];
    /// A PUBACK for packet id 0, which no packet may have.
    pub const PUBACK_ID_ZERO: &[u8] = &[0x40, 0x02, 0x00, 0x00];
    /// A second CONNACK, with a length that does not fit its type.
    pub const BAD_CONNACK: &[u8] = &[0x20, 0x05, 0x00, 0x00, 0x01, 0x02, 0x03];
}

struct Shared {
    behaviour: Mutex<Option<Hostile>>,
    /// Connections met by a hostile behaviour, and their signal.
    hostile: AtomicUsize,
    met: tokio::sync::Notify,
    hubsim_port: u16,
    hub_name: String,
    tls_server: tokio_rustls::TlsAcceptor,
    tls_client: tokio_rustls::TlsConnector,
}

/// The hostile hub, listening on every loopback address on `port` until the test's runtime ends
/// (or [`HostileHub::close`]).
pub struct HostileHub {
    pub port: u16,
    shared: Arc<Shared>,
    accepting: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl HostileHub {
    /// A hostile hub in front of `running`, whose state (and so TLS certificate) is in
    /// `sim_state_dir`. It starts out behaving.
    pub async fn start(running: &hubsim::Running, sim_state_dir: &std::path::Path) -> HostileHub {
        let (hub_name, hub_addr) = running.hub_addrs[0].clone();
        let names = [hub_name.clone(), hub_addr.ip().to_string()];
        let pki = hubsim::pki::load_or_create(sim_state_dir, &names).unwrap();
        let server = hubsim::pki::server_tls_config(&pki).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(running.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(None),
            hostile: AtomicUsize::new(0),
            met: tokio::sync::Notify::new(),
            hubsim_port: running.mqtt_addr.port(),
            hub_name,
            tls_server: tokio_rustls::TlsAcceptor::from(server),
            tls_client: tokio_rustls::TlsConnector::from(Arc::new(client)),
        });
        let listener = TcpListener::bind(("0.0.0.0", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepting = Mutex::new(Some(accept(listener, shared.clone())));
        HostileHub {
            port,
            shared,
            accepting,
        }
    }

    /// Closes the port, as a route going down does: connections are refused until
    /// [`HostileHub::open`] (those already carried go on until either side closes them).
    pub fn close(&self) {
        if let Some(task) = self.accepting.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Opens the port again after [`HostileHub::close`].
    pub async fn open(&self) {
        let deadline = std::time::Instant::now() + crate::WAIT;
        // The closed listener goes away with its aborted task, a moment after `close`.
        let listener = loop {
            match TcpListener::bind(("0.0.0.0", self.port)).await {
                Ok(listener) => break listener,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("cannot open port {} again: {e}", self.port)
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        *self.accepting.lock().unwrap() = Some(accept(listener, self.shared.clone()));
    }

    /// From now on new connections meet `behaviour`; `None`: they reach hubsim unchanged.
    pub fn behave(&self, behaviour: Option<Hostile>) {
        *self.shared.behaviour.lock().unwrap() = behaviour;
    }

    /// How many connections met a hostile behaviour so far.
    pub fn hostile_connections(&self) -> usize {
        self.shared.hostile.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections met a hostile behaviour; false after [`crate::LONG_WAIT`].
    pub async fn wait_hostile_connections(&self, n: usize) -> bool {
        let deadline = tokio::time::Instant::now() + crate::LONG_WAIT;
        loop {
            let met = self.shared.met.notified();
            if self.hostile_connections() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, met).await.is_err() {
                return self.hostile_connections() >= n;
            }
        }
    }
}

/// Serves every connection `listener` accepts, until the task is aborted.
fn accept(listener: TcpListener, shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move { shared.serve(inbound).await });
        }
    })
}

impl Shared {
    async fn serve(self: Arc<Self>, mut inbound: TcpStream) {
        let Ok(local) = inbound.local_addr() else {
            return;
        };
        let hubsim = SocketAddr::new(local.ip(), self.hubsim_port);
        let behaviour = self.behaviour.lock().unwrap().clone();
        let Some(behaviour) = behaviour else {
            if let Ok(mut outbound) = TcpStream::connect(hubsim).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
            return;
        };
        self.hostile.fetch_add(1, Ordering::SeqCst);
        self.met.notify_waiters();
        match behaviour {
            Hostile::NeverReads => hold(inbound).await,
            Hostile::TlsStall => {
                let mut hello = [0u8; 512];
                let _ = inbound.read(&mut hello).await;
                hold(inbound).await
            }
            Hostile::NoConnack => {
                let Ok(mut tls) = self.tls_server.accept(inbound).await else {
                    return;
                };
                let _ = read_packet(&mut tls).await;
                hold(tls).await
            }
            Hostile::Inject { bytes, after } => {
                self.man_in_the_middle(inbound, hubsim, Some((bytes, after)), false)
                    .await
            }
            Hostile::DuplicatePuback => self.man_in_the_middle(inbound, hubsim, None, true).await,
        }
    }

    /// The agent's session with hubsim through two TLS connections, the hub's packets read one
    /// by one: `inject` goes out after the CONNACK, `twice` sends each PUBACK twice.
    async fn man_in_the_middle(
        &self,
        inbound: TcpStream,
        hubsim: SocketAddr,
        inject: Option<(Vec<u8>, After)>,
        twice: bool,
    ) {
        let Ok(agent) = self.tls_server.accept(inbound).await else {
            return;
        };
        let Ok(tcp) = TcpStream::connect(hubsim).await else {
            return;
        };
        let name = rustls_pki_types::ServerName::try_from(self.hub_name.clone()).unwrap();
        let Ok(hub) = self.tls_client.connect(name, tcp).await else {
            return;
        };
        let (mut agent_read, mut agent_write) = tokio::io::split(agent);
        let (mut hub_read, mut hub_write) = tokio::io::split(hub);
        let upstream = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut agent_read, &mut hub_write).await;
            let _ = hub_write.shutdown().await;
        });
        let mut first = true;
        while let Some(packet) = read_packet(&mut hub_read).await {
            if agent_write.write_all(&packet).await.is_err() {
                break;
            }
            if twice && packet[0] & 0xF0 == 0x40 && agent_write.write_all(&packet).await.is_err() {
                break;
            }
            if std::mem::take(&mut first)
                && let Some((bytes, after)) = &inject
            {
                let _ = agent_write.write_all(bytes).await;
                let _ = agent_write.flush().await;
                match after {
                    After::Forward => {}
                    After::Stall => {
                        upstream.abort();
                        let _keep = (hub_read, agent_write);
                        std::future::pending::<()>().await;
                        return;
                    }
                    After::Close => break,
                }
            }
            let _ = agent_write.flush().await;
        }
        upstream.abort();
        let _ = agent_write.shutdown().await;
    }
}

/// Keeps a connection open, doing nothing with it, until the test's runtime ends.
async fn hold<T>(connection: T) {
    let _keep = connection;
    std::future::pending::<()>().await
}

/// One whole MQTT packet (fixed header, remaining length, body); `None` at the end of the stream
/// or on a length MQTT cannot have.
async fn read_packet(from: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut packet = vec![from.read_u8().await.ok()?];
    let mut length = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = from.read_u8().await.ok()?;
        packet.push(byte);
        length |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            let start = packet.len();
            packet.resize(start + length, 0);
            from.read_exact(&mut packet[start..]).await.ok()?;
            return Some(packet);
        }
    }
    None
}
