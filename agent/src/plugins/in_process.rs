//! A library plugin loaded into the daemon itself (`isolation = "in-process"`), called from a
//! thread of its own. It cannot be killed: one that hangs stays until the agent restarts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde_json::Value;
use tokio::sync::oneshot;

use super::answer::Answer;
use super::calls::C2dMessage;
use super::library::{self, HostSide, Library, PluginMessage};
use super::running::{Event, Events};

/// A library plugin running on a thread of the daemon.
pub struct InProcessPlugin {
    calls: std::sync::mpsc::Sender<Call>,
}

/// A call for the plugin's thread.
enum Call {
    Apply(String),
    Method(u64, String, String),
    C2d(u64, C2dMessage),
    Stop(oneshot::Sender<()>),
}

/// The plugin's calls, straight to its task.
struct DirectHost {
    events: Events,
}

impl HostSide for DirectHost {
    fn publish(&self, message: PluginMessage) -> i32 {
        let (answer, rx) = Answer::channel();
        if self.events.send(Event::Message(message, answer)).is_err() {
            return abi::ERR_STOPPING;
        }
        // Plugin threads are not runtime threads, so blocking here is allowed.
        if tokio::runtime::Handle::try_current().is_ok() {
            return abi::ERR_FAILED; // never block a runtime thread
        }
        rx.blocking_recv().unwrap_or(abi::ERR_STOPPING)
    }

    fn publish_batch(&self, messages: Vec<PluginMessage>) -> Vec<i32> {
        let count = messages.len();
        if count == 0 {
            return Vec::new();
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            return vec![abi::ERR_FAILED; count]; // never block a runtime thread
        }
        let (answer, rx) = Answer::channel();
        if self.events.send(Event::Batch(messages, answer)).is_err() {
            return vec![abi::ERR_STOPPING; count];
        }
        rx.blocking_recv()
            .unwrap_or_else(|_| vec![abi::ERR_STOPPING; count])
    }

    fn log(&self, level: i32, text: &str) {
        let _ = self.events.send(Event::Log(level, text.to_string()));
    }

    fn health(&self, state: i32, detail: &str) {
        let _ = self.events.send(Event::Health(state, detail.to_string()));
    }

    fn report(&self, properties: serde_json::Map<String, Value>) {
        let _ = self.events.send(Event::Reported(properties));
    }
}

impl InProcessPlugin {
    /// Loads the library and starts it on its thread; the answer arrives as
    /// [`Event::Started`].
    pub async fn launch(
        path: &Path,
        settings: &Value,
        allow_unsafe: bool,
        events: Events,
    ) -> Result<InProcessPlugin, String> {
        let path = path.to_path_buf();
        let library = tokio::task::spawn_blocking(move || Library::load(&path, allow_unsafe))
            .await
            .map_err(|e| format!("loading panicked: {e}"))??;
        let _ = events.send(Event::Loaded {
            abi: format!("{}.{}", library.abi_major, library.abi_minor),
            version: library.version.clone(),
        });
        let _ = events.send(Event::Declared(library.declarations.clone()));
        let (calls, receiver) = std::sync::mpsc::channel::<Call>();
        let settings = settings.to_string();
        std::thread::Builder::new()
            .name("plugin-inproc".into())
            .spawn(move || serve(library, &settings, receiver, events))
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(InProcessPlugin { calls })
    }

    /// Sends new settings; the answer arrives as [`Event::Applied`].
    pub fn apply(&self, settings: &Value) {
        let _ = self.calls.send(Call::Apply(settings.to_string()));
    }

    /// A direct method, answered by [`Event::MethodAnswer`].
    pub fn invoke(&self, id: u64, method: &str, payload: &Value) {
        let _ = self
            .calls
            .send(Call::Method(id, method.to_string(), payload.to_string()));
    }

    /// A C2D message, answered by [`Event::C2dTaken`].
    pub fn deliver(&self, id: u64, message: &C2dMessage) {
        let _ = self.calls.send(Call::C2d(id, message.clone()));
    }

    /// Asks the plugin to stop and waits up to `timeout`; a plugin that does not return is
    /// left behind on its thread.
    pub async fn stop(self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        let _ = self.calls.send(Call::Stop(tx));
        if tokio::time::timeout(timeout, rx).await.is_err() {
            tracing::error!(
                "an in-process plugin did not return from stop; its thread is left behind"
            );
        }
    }

    /// Cannot be killed; asks it to stop without waiting (it may be hung).
    pub fn kill(self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.calls.send(Call::Stop(tx));
    }
}

/// The plugin's thread: starts it, then makes its calls one at a time until stop.
fn serve(library: Library, settings: &str, calls: std::sync::mpsc::Receiver<Call>, events: Events) {
    let host: Arc<dyn HostSide> = Arc::new(DirectHost {
        events: events.clone(),
    });
    let mut instance = match library.start(host, settings) {
        Ok(i) => {
            let _ = events.send(Event::Started(Ok(())));
            Some(i)
        }
        Err(e) => {
            let _ = events.send(Event::Started(Err(e)));
            None
        }
    };
    for call in calls {
        match call {
            Call::Apply(s) => {
                let r = library::apply_if_started(instance.as_mut(), &s);
                let _ = events.send(Event::Applied(r));
            }
            Call::Method(id, method, payload) => {
                let answer = library::invoke_if_started(instance.as_mut(), &method, &payload);
                let _ = events.send(Event::MethodAnswer(id, answer));
            }
            Call::C2d(id, message) => {
                let taken = library::receive_if_started(instance.as_mut(), &message)
                    .map_err(|e| e.to_string());
                let _ = events.send(Event::C2dTaken(id, taken));
            }
            Call::Stop(done) => {
                if let Some(i) = instance.take() {
                    i.stop();
                }
                let _ = done.send(());
                return;
            }
        }
    }
}
