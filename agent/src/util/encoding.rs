//! Text encodings shared by SAS tokens, MQTT topics and property bags, and capping text to a
//! number of UTF-8 bytes.

/// What `url_encode` leaves as it is: the unreserved characters.
const UNRESERVED_COMPLEMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encoding as Python's `quote(safe="")`: unreserved characters stay, the rest is encoded.
pub fn url_encode(s: &str) -> String {
    url_encoded(s).to_string()
}

/// [`url_encode`] written where it is displayed, without a string of its own.
pub fn url_encoded(s: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(s, UNRESERVED_COMPLEMENT)
}

/// Appends [`url_encode`]`(s)` to `out`, in the pieces the encoder yields: no formatting
/// machinery, on the hot path of every telemetry topic.
pub fn push_url_encoded(out: &mut String, s: &str) {
    out.extend(url_encoded(s));
}

/// `text` if it fits in `max_bytes` of UTF-8, else its start (cut at a character boundary) and a
/// note of how long it was, the whole within `max_bytes`.
pub fn cap_text(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let note = format!("… [{} bytes, truncated]", text.len());
    let mut end = max_bytes.saturating_sub(note.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_text_fits_and_says_it_was_cut() {
        assert_eq!(cap_text("short", 10), "short");
        assert_eq!(cap_text("exactly10!", 10), "exactly10!");
        let long = "é".repeat(3000); // 6000 bytes, 2-byte characters
        let capped = cap_text(&long, 1024);
        assert!(capped.len() <= 1024, "{}", capped.len());
        assert!(
            capped.len() > 1000,
            "keeps as much as fits: {}",
            capped.len()
        );
        assert!(capped.ends_with("… [6000 bytes, truncated]"), "{capped}");
        assert!(capped.starts_with("éé"));
    }
}
