//! The status page at `/`: one self-contained HTML file (`status.html`, inline CSS and
//! vanilla JavaScript, no external resource, no build step) compiled into the binary,
//! so it works in an air-gapped region and always matches the gateway it comes from.
//!
//! The route is open like `/metrics`; the page itself holds no data. It reads
//! `/api/v1/status`, `/api/v1/journal`, `/api/v1/bridge` (bearer token) and `/metrics`
//! every 2 s. The token comes from the URL fragment (`/#token=...`, never sent to the
//! server), moves to the tab's sessionStorage and leaves the address bar; without it the
//! page asks for it when the API answers 401.
//!
//! The Content-Security-Policy allows exactly the page's one inline script and one inline
//! style, by SHA-256: injected markup could not run a script, and the page can talk to
//! nothing but this gateway. Editing `status.html`'s `<script>` or `<style>` changes its
//! hash; `tests/tests/status_page.rs` names the new value (or:
//! `openssl dgst -sha256 -binary | openssl base64` of the text between the tags).

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("status.html");

/// The SHA-256 of the text between `<script>` and `</script>` in `status.html`.
const SCRIPT_HASH: &str = "sha256-7G0kyvFeOgZB2whhUG0bPO6m1Hrfe9QLIQX0WRpzsTM=";
/// The SHA-256 of the text between `<style>` and `</style>` in `status.html`.
const STYLE_HASH: &str = "sha256-Sp1ZNI9kk5mZnUdn8i4bq6Tev5cH5yvxCxYFkTO8iek=";

fn csp() -> String {
    format!(
        "default-src 'none'; script-src '{SCRIPT_HASH}'; style-src '{STYLE_HASH}'; \
         connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `GET /`: the status page.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (header::CONTENT_SECURITY_POLICY, csp()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::REFERRER_POLICY, "no-referrer".to_string()),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    /// Nothing outside the gateway: no remote script, style, font or image, so the page
    /// works without Internet access (the integration test checks the rendered page too).
    #[test]
    fn page_is_self_contained() {
        let lower = PAGE.to_ascii_lowercase();
        for needle in ["http://", "https://", "src=", "@import", "url("] {
            assert!(!lower.contains(needle), "status.html contains {needle:?}");
        }
        assert_eq!(
            lower.matches("<script").count(),
            1,
            "one inline script (its hash is in the CSP)"
        );
        assert_eq!(
            lower.matches("<style").count(),
            1,
            "one inline style (its hash is in the CSP)"
        );
        assert!(
            !lower.contains(" style="),
            "style attributes are blocked by the CSP"
        );
        let handler = lower.match_indices(" on").any(|(i, _)| {
            let rest = &lower[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(
            !handler,
            "inline event handlers (onclick=...) are blocked by the CSP"
        );
    }
}
