//! What the hub bills for a device-to-cloud message, as Azure meters it (docs/hubsim.md,
//! "Metering"): the message's size is its body plus the values of its system properties plus the
//! names and values of its application properties, and it is billed in blocks of 4 KB (basic and
//! standard tiers), a message of any size at least one block.

/// One billing block of the basic and standard tiers (the free tier meters 0.5 KB blocks).
pub const BLOCK_BYTES: usize = 4096;

/// The size Azure meters: body bytes, system property values (not their names), application
/// property names and values. Properties the hub stamps itself (`iothub-*`) are not the
/// device's message and are not counted.
pub fn metered_size<'a>(
    body: usize,
    system_values: impl IntoIterator<Item = &'a str>,
    application: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> usize {
    body + system_values.into_iter().map(str::len).sum::<usize>()
        + application
            .into_iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Billed blocks for a message of `size` metered bytes: 4 KB chunks, at least one.
pub fn billed_blocks(size: usize) -> u64 {
    size.div_ceil(BLOCK_BYTES).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_4kb_chunks_and_at_least_one() {
        // Azure's own examples: a 100-byte message is one message, a 6 KB message two.
        assert_eq!(billed_blocks(100), 1);
        assert_eq!(billed_blocks(6 * 1024), 2);
        assert_eq!(billed_blocks(0), 1);
        assert_eq!(billed_blocks(4096), 1);
        assert_eq!(billed_blocks(4097), 2);
        assert_eq!(billed_blocks(256 * 1024), 64);
    }

    #[test]
    fn size_counts_body_system_values_and_application_names_and_values() {
        let size = metered_size(
            4060,
            ["0123456789", "application/json"],
            [("source", "sensor"), ("k", "")],
        );
        assert_eq!(size, 4060 + 10 + 16 + 6 + 6 + 1);
        // Properties alone can push a message into the next block.
        assert_eq!(billed_blocks(size), 2);
        assert_eq!(billed_blocks(metered_size(4060, ["0123456789"], [])), 1);
    }
}
