//! hubsim's own capacity, so its limits are known before a figure measured through it is trusted:
//! `register` runs N DPS registrations over MQTT (symmetric-key enrollment group, `concurrency`
//! at a time) and prints registrations/s, overall and over the first and the last `--window`
//! registrations to complete (does the cost grow with the devices already enrolled?); `hold`
//! connects N of those devices to the hub and holds every connection until stdin closes, printing
//! how many are up. Each prints JSON lines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use tokio::sync::Semaphore;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// The enrollment group's primary key (base64); device keys are derived from it.
    #[arg(long, env = "BENCH_GROUP_KEY")]
    group_key: String,
    /// Registration ids are `{prefix}-{n}`.
    #[arg(long, default_value = "bench-dev")]
    prefix: String,
    #[arg(long, default_value_t = 500)]
    count: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// `register`: also report the rate of the first and of the last this many completions.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    Register {
        #[arg(long, default_value = "0ne00000001")]
        id_scope: String,
    },
    Hold {
        /// The hub's host name (hubsim's default hub; dialled by this name).
        #[arg(long, default_value = "127.0.0.2")]
        hub: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let tls = hubagent_bench::tls(&args.ca)?;
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let completions = Arc::new(std::sync::Mutex::new(Vec::with_capacity(args.count)));
    let start = hubagent_bench::unix_now();
    let mut tasks = Vec::new();
    for n in 0..args.count {
        let (args, tls, gate) = (args.clone(), tls.clone(), gate.clone());
        let (ok, failed, first_error) = (ok.clone(), failed.clone(), first_error.clone());
        let completions = completions.clone();
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore open");
            let id = format!("{}-{n}", args.prefix);
            let key = hubagent_bench::derive_device_key(&args.group_key, &id)?;
            let outcome = match &args.what {
                What::Register { id_scope } => register(&args, &tls, id_scope, &id, &key)
                    .await
                    .map(|()| None),
                What::Hold { hub } => connect(&args, &tls, hub, &id, &key).await.map(Some),
            };
            drop(permit);
            match outcome {
                Ok(held) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    completions.lock().unwrap().push(hubagent_bench::unix_now());
                    if let Some((_client, mut eventloop)) = held {
                        // Keep the connection serviced (pings) until the process ends.
                        while eventloop.poll().await.is_ok() {}
                        failed.fetch_add(1, Ordering::Relaxed);
                        ok.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap()
                        .get_or_insert_with(|| format!("{id}: {e:#}"));
                }
            }
            anyhow::Ok(())
        }));
    }
    let report = |ok: u64, failed: u64, elapsed: f64| {
        serde_json::json!({
            "ok": ok,
            "failed": failed,
            "seconds": elapsed,
            "per_s": ok as f64 / elapsed,
            "first_error": first_error.lock().unwrap().clone(),
        })
    };
    match args.what {
        What::Register { .. } => {
            for t in tasks {
                t.await??;
            }
            let elapsed = hubagent_bench::unix_now() - start;
            let mut line = report(
                ok.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
                elapsed,
            );
            let mut times = completions.lock().unwrap().clone();
            times.sort_by(f64::total_cmp);
            if let Some((first, last)) = window_rates(start, &times, args.window) {
                line["window"] = args.window.into();
                line["first_window_per_s"] = first.into();
                line["last_window_per_s"] = last.into();
            }
            println!("{line}");
        }
        What::Hold { .. } => {
            // Report once every connection attempt has finished, then hold until stdin closes.
            let total = args.count as u64;
            while ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < total {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let elapsed = hubagent_bench::unix_now() - start;
            println!(
                "{}",
                report(
                    ok.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    elapsed
                )
            );
            // Blocking read on its own thread: the workspace's tokio has no `io-std`.
            let _ = tokio::task::spawn_blocking(|| {
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
            })
            .await;
            println!(
                "{}",
                serde_json::json!({"still_connected": ok.load(Ordering::Relaxed)})
            );
        }
    }
    Ok(())
}

/// Registrations/s over the first `window` completions (from the start) and over the last
/// `window` (from the completion just before them); `None` without two whole windows.
fn window_rates(start: f64, sorted: &[f64], window: usize) -> Option<(f64, f64)> {
    if window == 0 || sorted.len() < 2 * window {
        return None;
    }
    let first = window as f64 / (sorted[window - 1] - start);
    let last_end = sorted[sorted.len() - 1];
    let last_start = sorted[sorted.len() - 1 - window];
    Some((first, window as f64 / (last_end - last_start)))
}

/// A registration is a few small packets each way (SUBSCRIBE and PUBLISH back to back): with
/// Nagle's algorithm the second waits for the server's delayed ACK (40 ms on Linux), and the
/// figure would be that wait, not hubsim. hubsim's own sockets have TCP_NODELAY.
fn no_nagle(eventloop: &mut rumqttc::EventLoop) {
    let mut options = eventloop.network_options();
    options.set_tcp_nodelay(true);
    eventloop.set_network_options(options);
}

async fn register(
    args: &Args,
    tls: &Arc<rustls::ClientConfig>,
    scope: &str,
    id: &str,
    key: &str,
) -> anyhow::Result<()> {
    let password = hubagent_bench::sas(
        key,
        &format!("{scope}/registrations/{id}"),
        Some("registration"),
    )?;
    let username = format!("{scope}/registrations/{id}/api-version=2019-03-31");
    let (client, mut eventloop) =
        hubagent_bench::client(tls, "localhost", id, args.port, &username, &password, 4);
    no_nagle(&mut eventloop);
    client
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await?;
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            false,
            serde_json::json!({"registrationId": id}).to_string(),
        )
        .await?;
    let mut rid = 1;
    loop {
        let publish = match eventloop.poll().await.context("DPS connection")? {
            Event::Incoming(Packet::Publish(p)) => p,
            _ => continue,
        };
        let status = publish
            .topic
            .strip_prefix("$dps/registrations/res/")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("");
        let answer: Value = serde_json::from_slice(&publish.payload)?;
        match status {
            "200" if answer["status"] == "assigned" => break,
            "202" | "200" => {
                let op = answer["operationId"]
                    .as_str()
                    .context("202 without operationId")?;
                rid += 1;
                client
                    .publish(
                        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}", hubagent::util::encoding::url_encode(op)),
                        QoS::AtLeastOnce,
                        false,
                        Vec::new(),
                    )
                    .await?;
            }
            other => bail!("DPS answered {other}: {answer}"),
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

async fn connect(
    args: &Args,
    tls: &Arc<rustls::ClientConfig>,
    hub: &str,
    id: &str,
    key: &str,
) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let password = hubagent_bench::sas(key, &format!("{hub}/devices/{id}"), None)?;
    let username = format!("{hub}/{id}/?api-version=2021-04-12");
    let (client, mut eventloop) =
        hubagent_bench::client(tls, hub, id, args.port, &username, &password, 4);
    no_nagle(&mut eventloop);
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    // The caller keeps the client: dropping it would end the event loop.
    Ok((client, eventloop))
}
