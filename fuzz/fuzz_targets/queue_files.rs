//! Any bytes found as a queue segment (and as the ack file) after a crash: the queue opens,
//! reports what it skipped, and every record it keeps can be read back. The first byte (modulo
//! the length) is where the ack file ends and the segment begins. Seeds: compact records (and
//! JSON records of older agents, and both mixed) as docs/queue.md lays them out.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let split = data
        .first()
        .map(|b| *b as usize % (data.len().max(1)))
        .unwrap_or(0);
    std::fs::write(
        dir.path().join("0000000000000001.seg"),
        &data[split.min(data.len())..],
    )
    .unwrap();
    std::fs::write(dir.path().join("acked"), &data[..split.min(data.len())]).unwrap();
    let settings = hubagent::telemetry::queue::QueueSettings::default();
    if let Ok((queue, _warnings)) = hubagent::telemetry::queue::Queue::open(dir.path(), settings) {
        let found = queue.stats();
        let batch = queue.take_batch(usize::MAX);
        assert!(batch.len() as u64 <= found.depth);
        // Every record kept at open was decoded then: none fails to read back now.
        assert_eq!(queue.stats().dropped_corrupt, found.dropped_corrupt);
        for (seq, _) in batch {
            queue.ack(seq);
        }
        queue.close();
    }
});
