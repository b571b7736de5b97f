//! The limit of the agent's path: a bare rumqttc client that publishes `count` messages (QoS 1,
//! the same body size and system properties as the agent) to hubsim as one device with SAS
//! authentication, keeping `inflight` unacknowledged, and prints one JSON line with the timing.

use clap::Parser;
use rumqttc::{Event, Outgoing, Packet, QoS};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// The hub's host name (hubsim's default hub; dialled by this name).
    #[arg(long, default_value = "127.0.0.2")]
    hub: String,
    #[arg(long)]
    device_id: String,
    /// The device's primary key (base64).
    #[arg(long, env = "BENCH_DEVICE_KEY")]
    key: String,
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Unacknowledged messages at a time (the agent's `[hub] inflight` default is 32).
    #[arg(long, default_value_t = 32)]
    inflight: u16,
    /// MQTT over WebSockets (`--port` is then hubsim's HTTPS port).
    #[arg(long)]
    websocket: bool,
    /// Through this HTTP proxy (`host:port`, CONNECT, no authentication).
    #[arg(long)]
    proxy: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = hubagent_bench::tls(&args.ca)?;
    let resource = format!("{}/devices/{}", args.hub, args.device_id);
    let password = hubagent_bench::sas(&args.key, &resource, None)?;
    let username = format!("{}/{}/?api-version=2021-04-12", args.hub, args.device_id);
    let proxy = match &args.proxy {
        Some(proxy) => {
            let (host, port) = proxy
                .rsplit_once(':')
                .ok_or_else(|| anyhow::anyhow!("--proxy {proxy}: write host:port"))?;
            Some((host.to_string(), port.parse()?))
        }
        None => None,
    };
    let route = hubagent_bench::Route {
        websocket: args.websocket,
        proxy,
    };
    let (client, mut eventloop) = hubagent_bench::client_by(
        &tls,
        &args.hub,
        &args.device_id,
        args.port,
        &username,
        &password,
        args.inflight,
        &route,
    );
    let connect_start = hubagent_bench::unix_now();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("connecting to hubsim on port {}: {e}", args.port),
        }
    }
    let connected = hubagent_bench::unix_now();
    let topic_prefix = format!("devices/{}/messages/events/", args.device_id);
    let (count, size) = (args.count, args.size);
    let publisher = tokio::spawn(async move {
        for seq in 1..=count {
            let topic = format!(
                "{topic_prefix}%24.mid={}&%24.ct=application%2Fjson&%24.ce=utf-8",
                uuid::Uuid::new_v4()
            );
            client
                .publish(
                    topic,
                    QoS::AtLeastOnce,
                    false,
                    hubagent_bench::body(seq, size),
                )
                .await?;
        }
        anyhow::Ok(client)
    });
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut first_sent = None;
    while acked < count {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                sent += 1;
                first_sent.get_or_insert_with(hubagent_bench::unix_now);
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => anyhow::bail!("after {sent} sent and {acked} acknowledged: {e}"),
        }
    }
    let done = hubagent_bench::unix_now();
    let client = publisher.await??;
    let _ = client.try_disconnect();
    let start = first_sent.unwrap_or(connected);
    println!(
        "{}",
        serde_json::json!({
            "count": count,
            "connect_seconds": connected - connect_start,
            "seconds": done - start,
            "msgs_per_s": count as f64 / (done - start),
        })
    );
    Ok(())
}
