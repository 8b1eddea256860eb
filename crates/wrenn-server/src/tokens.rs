//! Secrets derived or checked by the control plane: envd access tokens, agent secrets, API
//! keys and signed `/files` URLs.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The envd access token of a sandbox: lowercase hex HMAC-SHA256(server secret, sandbox ID).
/// Derived, never stored, and stable across pause and resume, so any control plane replica can
/// hand it out again.
pub fn envd_access_token(secret: &[u8], sandbox_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(sandbox_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The secret a host agent reached over the network requires of the control plane
/// (`Authorization` / `Proxy-Authorization: Bearer`): lowercase hex
/// HMAC-SHA256(server secret, `agent-secret:<host ID>`). One per host, so a host that leaks its
/// own cannot drive another; derived, never stored. (Host and sandbox IDs have no `:`, so no
/// labelled message equals a bare sandbox ID, the message of envd tokens.)
pub fn agent_secret(secret: &[u8], host_id: &str) -> String {
    labelled_hmac(secret, "agent-secret", host_id)
}

/// The traffic access token of a sandbox created with `network.allowPublicTraffic: false`:
/// its ports other than envd's answer only requests carrying it (`E2b-Traffic-Access-Token`).
/// Lowercase hex HMAC-SHA256(server secret, `traffic-access-token:<sandbox ID>`): derived,
/// never stored, and unlike the envd token (a page a user may share must not open envd).
pub fn traffic_access_token(secret: &[u8], sandbox_id: &str) -> String {
    labelled_hmac(secret, "traffic-access-token", sandbox_id)
}

/// The signature of a build-context archive URL: lowercase hex HMAC-SHA256(server secret,
/// `build-file:<method>:<team>:<hash>:<expires>`), so an upload link cannot be used to read, a
/// download link cannot be used to write, and neither works for another team, archive or time.
pub fn build_file_signature(
    secret: &[u8],
    method: &str,
    team: &str,
    hash: &str,
    expires_unix: i64,
) -> String {
    labelled_hmac(
        secret,
        "build-file",
        &format!("{method}:{team}:{hash}:{expires_unix}"),
    )
}

fn labelled_hmac(secret: &[u8], label: &str, id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(label.as_bytes());
    mac.update(b":");
    mac.update(id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The stored form of an API key: lowercase hex SHA-256 of the whole key string.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key in E2B's shape: `e2b_` and 40 lowercase hex characters (20 random bytes).
pub fn new_api_key() -> String {
    let bytes: [u8; 20] = rand::random();
    format!("e2b_{}", hex::encode(bytes))
}

/// What is shown of a key after creation.
pub fn mask_api_key(key: &str) -> String {
    let head: String = key.chars().take(8).collect();
    format!("{head}...")
}

/// The signature the SDKs put on `/files` URLs (`py:e2b/sandbox/signature.py`):
/// `v1_` + base64 (standard alphabet, no padding) of
/// SHA-256(`<path>:<read|write>:<username or ''>:<token>[:<expiration>]`).
pub fn file_signature(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let mut raw = format!("{path}:{operation}:{username}:{token}");
    if let Some(exp) = expiration {
        raw.push_str(&format!(":{exp}"));
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Equality that takes the same time wherever the strings differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_file_signatures_bind_method_team_hash_and_time() {
        let s = b"secret";
        let base = build_file_signature(s, "PUT", "team", "ab", 10);
        assert_eq!(base.len(), 64);
        assert_ne!(base, build_file_signature(s, "GET", "team", "ab", 10));
        assert_ne!(base, build_file_signature(s, "PUT", "other", "ab", 10));
        assert_ne!(base, build_file_signature(s, "PUT", "team", "cd", 10));
        assert_ne!(base, build_file_signature(s, "PUT", "team", "ab", 11));
        assert_eq!(base, build_file_signature(s, "PUT", "team", "ab", 10));
    }

    #[test]
    fn access_tokens_are_stable_hex_hmacs() {
        let t = envd_access_token(b"secret", "abc");
        assert_eq!(t.len(), 64);
        assert!(
            t.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_eq!(t, envd_access_token(b"secret", "abc"));
        assert_ne!(t, envd_access_token(b"secret", "abd"));
        assert_ne!(t, envd_access_token(b"other", "abc"));
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            envd_access_token(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn agent_secrets_are_per_host_and_unlike_access_tokens() {
        let a = agent_secret(b"secret", "host-a");
        assert_eq!(a.len(), 64);
        assert_eq!(a, agent_secret(b"secret", "host-a"));
        assert_ne!(a, agent_secret(b"secret", "host-b"));
        assert_ne!(a, agent_secret(b"other", "host-a"));
        assert_ne!(a, envd_access_token(b"secret", "host-a"));
        assert_eq!(a, envd_access_token(b"secret", "agent-secret:host-a"));
        let t = traffic_access_token(b"secret", "abc");
        assert_eq!(t.len(), 64);
        assert_ne!(t, envd_access_token(b"secret", "abc"));
        assert_ne!(t, traffic_access_token(b"secret", "abd"));
        assert_eq!(t, envd_access_token(b"secret", "traffic-access-token:abc"));
    }

    #[test]
    fn file_signature_matches_the_sdk() {
        // Computed with the Python SDK 2.63: get_signature("/home/user/a.txt", "read", None,
        // "tok") -> its `signature` field.
        let sig = file_signature("/home/user/a.txt", "read", "", "tok", None);
        let raw = "/home/user/a.txt:read::tok";
        let want = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw))
        );
        assert_eq!(sig, want);
        assert!(!sig.ends_with('='));
        assert_ne!(
            sig,
            file_signature("/home/user/a.txt", "read", "", "tok", Some(5))
        );
    }

    #[test]
    fn api_keys() {
        let k = new_api_key();
        assert!(k.starts_with("e2b_") && k.len() == 44);
        assert_eq!(hash_api_key(&k).len(), 64);
        assert_ne!(hash_api_key(&k), hash_api_key(&new_api_key()));
        assert_eq!(mask_api_key("e2b_0123456789"), "e2b_0123...");
        assert!(
            constant_time_eq(b"ab", b"ab")
                && !constant_time_eq(b"ab", b"ac")
                && !constant_time_eq(b"a", b"ab")
        );
    }
}
