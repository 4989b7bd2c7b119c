//! Browser sessions of the dashboard: one-time login codes and the
//! cookies they are exchanged for.
//!
//! `dmm ui` asks the daemon (over its owner-only socket, or with the
//! token) for a login URL carrying a one-time code. The browser that
//! opens it first gets a session cookie (HttpOnly, SameSite=Strict), which
//! then stands in for the bearer token on every request of that browser.
//! Codes live a few minutes and work once; sessions end after an hour
//! without a request, and after twelve hours whatever happens. Only the
//! BLAKE3 hashes of codes and session secrets are kept, so a lookup takes
//! the same path whatever the guess.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a login code may wait to be used.
pub const CODE_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// A session ends after this long without a request…
pub const SESSION_IDLE: Duration = Duration::from_secs(60 * 60);
/// …and this long after the login in any case (the cookie's Max-Age).
pub const SESSION_MAX: Duration = Duration::from_secs(12 * 60 * 60);
/// The name of the session cookie.
pub const COOKIE: &str = "dmm_session";

/// Codes and sessions waiting at most; the oldest go first.
const KEPT: usize = 1024;

struct Session {
    created: Instant,
    last: Instant,
}

#[derive(Default)]
struct Inner {
    /// Hash of an unused code → when it was made.
    codes: HashMap<blake3::Hash, Instant>,
    sessions: HashMap<blake3::Hash, Session>,
}

/// The dashboard's login codes and sessions.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

/// 32 random bytes from the operating system, in hex.
fn secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(secret: &str) -> blake3::Hash {
    blake3::hash(secret.as_bytes())
}

impl Sessions {
    /// A new one-time login code.
    pub fn new_code(&self) -> String {
        let code = secret();
        let mut inner = self.inner.lock();
        inner.codes.retain(|_, made| made.elapsed() < CODE_LIFETIME);
        if inner.codes.len() >= KEPT
            && let Some(oldest) = inner
                .codes
                .iter()
                .min_by_key(|(_, made)| **made)
                .map(|(k, _)| *k)
        {
            inner.codes.remove(&oldest);
        }
        inner.codes.insert(hash(&code), Instant::now());
        code
    }

    /// Exchanges a code for a session secret (the cookie's value); `None`
    /// if the code is unknown, used or expired.
    pub fn redeem(&self, code: &str) -> Option<String> {
        let mut inner = self.inner.lock();
        let made = inner.codes.remove(&hash(code))?;
        if made.elapsed() >= CODE_LIFETIME {
            return None;
        }
        let session = secret();
        inner.sessions.retain(|_, s| live(s));
        if inner.sessions.len() >= KEPT
            && let Some(oldest) = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| *k)
        {
            inner.sessions.remove(&oldest);
        }
        let now = Instant::now();
        inner.sessions.insert(
            hash(&session),
            Session {
                created: now,
                last: now,
            },
        );
        Some(session)
    }

    /// Whether `secret` is a live session; a request with it keeps the
    /// session alive (up to [`SESSION_MAX`]).
    pub fn check(&self, secret: &str) -> bool {
        let mut inner = self.inner.lock();
        let key = hash(secret);
        match inner.sessions.get_mut(&key) {
            Some(session) if live(session) => {
                session.last = Instant::now();
                true
            }
            Some(_) => {
                inner.sessions.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Ends a session (logout).
    pub fn end(&self, secret: &str) {
        self.inner.lock().sessions.remove(&hash(secret));
    }
}

fn live(session: &Session) -> bool {
    session.last.elapsed() < SESSION_IDLE && session.created.elapsed() < SESSION_MAX
}

/// The `Set-Cookie` value that starts a session.
pub fn set_cookie(secret: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_MAX.as_secs()
    )
}

/// The `Set-Cookie` value that ends it.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The session secret in a request's `Cookie` headers, if any.
pub fn secret_in(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(from_cookie_header)
}

/// The session secret in a `Cookie` header, if any.
pub fn from_cookie_header(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_its_session_is_recognized() {
        let sessions = Sessions::default();
        let code = sessions.new_code();
        assert_eq!(code.len(), 64);
        let session = sessions.redeem(&code).expect("first use");
        assert!(sessions.redeem(&code).is_none(), "a code works once");
        assert!(sessions.check(&session));
        assert!(!sessions.check(&code), "a code is not a session");
        assert!(!sessions.check("0000"));
        sessions.end(&session);
        assert!(!sessions.check(&session));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let header = format!("theme=dark; {COOKIE}=abc123; other=1");
        assert_eq!(from_cookie_header(&header), Some("abc123"));
        assert_eq!(from_cookie_header("theme=dark"), None);
        let cookie = set_cookie("abc", false);
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(!cookie.contains("Secure"));
    }
}
