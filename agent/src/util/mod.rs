//! Leaf utilities: no dependency on any other module of the crate, so every layer may use them.

pub mod backoff;
pub mod encoding;
pub mod fs;
pub mod json;
pub mod test_hook;
pub mod time;
