//! What a caller sent, as an answer quotes it back: cut, so that no answer grows with the input
//! (a status past a client's 8 KiB metadata limit arrives as "Stream removed", not as the error),
//! and without the credentials a URL may carry.

/// Characters of the caller's text an error quotes at most.
pub const ECHO_CHARS: usize = 64;

/// `s` quoted, cut to [`ECHO_CHARS`] characters with its length said when longer.
pub fn echo(s: &str) -> String {
    if s.chars().count() <= ECHO_CHARS {
        return format!("{s:?}");
    }
    let cut: String = s.chars().take(ECHO_CHARS).collect();
    format!("{cut:?}… ({} bytes)", s.len())
}

/// `url` with any user name and password in it replaced by `***` (a callback URL may carry
/// credentials, which are not the business of whoever reads the job).
pub fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => echo(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_and_credentials_are_dropped() {
        assert_eq!(echo("pay"), "\"pay\"");
        let long = "x".repeat(4096);
        let shown = echo(&long);
        assert!(
            shown.len() < 100 && shown.ends_with("(4096 bytes)"),
            "{shown}"
        );
        assert_eq!(
            without_credentials("https://user:s3cret@hooks.example.com/done?x=1"),
            "https://***@hooks.example.com/done?x=1"
        );
        assert_eq!(
            without_credentials("https://hooks.example.com/done"),
            "https://hooks.example.com/done"
        );
    }
}
