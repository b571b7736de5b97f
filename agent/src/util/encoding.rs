//! Text encodings shared by SAS tokens, MQTT topics and property bags.

/// Percent-encoding as Python's `quote(safe="")`: unreserved characters stay, the rest is encoded.
pub fn url_encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}
