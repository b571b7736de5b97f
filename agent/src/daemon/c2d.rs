//! Cloud-to-device messages on their way to the plugins, at least once (#17). A message is
//! completed at the hub (its PUBACK) only once the plugin whose filter matches has taken it.
//! Until then the agent holds it and offers it again every [`RETRY_EVERY`] and whenever a plugin
//! changes (one restarting, or not yet declared, takes it later); the hub keeps it meanwhile and
//! delivers it again on the next connection if the connection ends or the agent stops.
//! Neither the body nor the properties are logged: they are the sender's data.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::hub::{C2dToken, SessionHandle};
use crate::plugins::Supervisor;
use crate::plugins::calls::C2dMessage;

/// How often held messages are offered again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A message not taken yet.
pub struct Held {
    message: C2dMessage,
    token: C2dToken,
    offers: u32,
}

/// The C2D messages of the current connection that no plugin has taken yet.
pub struct Inbox {
    held: Vec<Held>,
    /// Offers a plugin did not take come back here.
    back_tx: mpsc::UnboundedSender<Held>,
    back: mpsc::UnboundedReceiver<Held>,
}

impl Inbox {
    pub fn new() -> Inbox {
        let (back_tx, back) = mpsc::unbounded_channel();
        Inbox {
            held: Vec::new(),
            back_tx,
            back,
        }
    }

    /// A message from the hub: offered to the plugin that takes it.
    pub fn arrived(
        &mut self,
        plugins: &Supervisor,
        session: &SessionHandle,
        message: C2dMessage,
        token: C2dToken,
    ) {
        let held = Held {
            message,
            token,
            offers: 0,
        };
        self.offer(plugins, session, held);
    }

    /// Offers every held message again.
    pub fn retry(&mut self, plugins: &Supervisor, session: &SessionHandle) {
        for held in std::mem::take(&mut self.held) {
            self.offer(plugins, session, held);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// An offer that was not taken (to [`Inbox::hold`]).
    pub async fn not_taken(&mut self) -> Held {
        self.back
            .recv()
            .await
            .expect("the inbox keeps a sender itself")
    }

    pub fn hold(&mut self, held: Held) {
        self.held.push(held);
    }

    fn offer(&mut self, plugins: &Supervisor, session: &SessionHandle, mut held: Held) {
        if !session.is_current(&held.token) {
            // Its connection ended: the hub delivers it again on the next one.
            return;
        }
        held.offers += 1;
        let first = held.offers == 1;
        let message_id = held.message.message_id.clone();
        let Some((plugin, taken)) = plugins.deliver_c2d(held.message.clone()) else {
            if first {
                tracing::warn!(
                    message_id,
                    "cloud-to-device message not completed: no plugin takes it; held and offered \
                     again, and the hub delivers it again on the next connection"
                );
            }
            self.held.push(held);
            return;
        };
        let (session, back) = (session.clone(), self.back_tx.clone());
        tokio::spawn(async move {
            match taken.await {
                Ok(()) => {
                    tracing::info!(
                        message_id,
                        plugin,
                        "cloud-to-device message taken; completing it"
                    );
                    session.complete_c2d(held.token);
                }
                Err(why) => {
                    if first {
                        tracing::warn!(
                            message_id,
                            plugin,
                            "cloud-to-device message not taken ({why}); held and offered again"
                        );
                    }
                    let _ = back.send(held);
                }
            }
        });
    }
}
