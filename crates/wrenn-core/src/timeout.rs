//! Timeout arithmetic: when a sandbox ends, and how `timeout`, `refreshes` and `connect` move
//! that point.
//!
//! Times are Unix milliseconds passed in by the caller; nothing here reads a clock.

/// Timeout of a sandbox created without one (the SDKs document 300 s as the default).
pub const DEFAULT_TIMEOUT_SECS: i64 = 300;
/// Default upper bound on any timeout (E2B's highest tier allows 24 hours).
pub const MAX_TIMEOUT_SECS: i64 = 24 * 3600;
/// A refresh always extends by at least this much (as E2B's API does).
pub const MIN_REFRESH_SECS: i64 = 15;
/// Longest single refresh (E2B's API bound).
const MAX_REFRESH_SECS: i64 = 3600;

/// A point in time, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn plus_secs(self, secs: i64) -> UnixMillis {
        UnixMillis(self.0.saturating_add(secs.saturating_mul(1000)))
    }
}

/// Why a timeout value is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error("Timeout must not be negative (got {0} s)")]
    Negative(i64),
    #[error("Timeout cannot be greater than {max} seconds (got {got} s)")]
    TooLong { got: i64, max: i64 },
    #[error("Refresh duration must be between 0 and {MAX_REFRESH_SECS} seconds (got {0} s)")]
    BadRefresh(i64),
}

/// The timeout rules of one control plane (the upper bound is configurable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub max_timeout_secs: i64,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline {
            max_timeout_secs: MAX_TIMEOUT_SECS,
        }
    }
}

impl Deadline {
    /// Checks a client-supplied timeout (seconds); `None` means the default.
    pub fn validate(&self, secs: Option<i64>) -> Result<i64, TimeoutError> {
        let secs = secs.unwrap_or(DEFAULT_TIMEOUT_SECS.min(self.max_timeout_secs));
        if secs < 0 {
            return Err(TimeoutError::Negative(secs));
        }
        if secs > self.max_timeout_secs {
            return Err(TimeoutError::TooLong {
                got: secs,
                max: self.max_timeout_secs,
            });
        }
        Ok(secs)
    }

    /// The end of a sandbox created (or resumed) at `now` with this timeout.
    pub fn end_at(&self, now: UnixMillis, secs: Option<i64>) -> Result<UnixMillis, TimeoutError> {
        Ok(now.plus_secs(self.validate(secs)?))
    }

    /// `POST /sandboxes/{id}/timeout`: the end becomes `now + secs`, which may shorten it.
    pub fn set_timeout(&self, now: UnixMillis, secs: i64) -> Result<UnixMillis, TimeoutError> {
        self.end_at(now, Some(secs))
    }

    /// `POST /sandboxes/{id}/connect` on a running sandbox: extends to `now + secs` but never
    /// shortens.
    pub fn extend(
        &self,
        now: UnixMillis,
        current_end: UnixMillis,
        secs: Option<i64>,
    ) -> Result<UnixMillis, TimeoutError> {
        Ok(current_end.max(self.end_at(now, secs)?))
    }

    /// `POST /sandboxes/{id}/refreshes`: extends by at least [`MIN_REFRESH_SECS`], never
    /// shortens.
    pub fn refresh(
        &self,
        now: UnixMillis,
        current_end: UnixMillis,
        duration_secs: Option<i64>,
    ) -> Result<UnixMillis, TimeoutError> {
        let d = duration_secs.unwrap_or(0);
        if !(0..=MAX_REFRESH_SECS).contains(&d) {
            return Err(TimeoutError::BadRefresh(d));
        }
        let end = now.plus_secs(d.max(MIN_REFRESH_SECS).min(self.max_timeout_secs));
        Ok(current_end.max(end))
    }
}

/// The agent's own deadline for a sandbox: the control plane's end plus a grace period, so the
/// agent acts only when the control plane (which normally kills or pauses first) is gone.
pub fn backstop(end: UnixMillis, grace_secs: i64) -> UnixMillis {
    end.plus_secs(grace_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(1_000_000);

    #[test]
    fn create_timeouts() {
        let d = Deadline::default();
        assert_eq!(d.end_at(NOW, None), Ok(UnixMillis(1_300_000)));
        assert_eq!(d.end_at(NOW, Some(60)), Ok(UnixMillis(1_060_000)));
        assert_eq!(d.end_at(NOW, Some(0)), Ok(NOW));
        assert_eq!(d.end_at(NOW, Some(-1)), Err(TimeoutError::Negative(-1)));
        assert_eq!(
            d.end_at(NOW, Some(MAX_TIMEOUT_SECS + 1)),
            Err(TimeoutError::TooLong {
                got: MAX_TIMEOUT_SECS + 1,
                max: MAX_TIMEOUT_SECS
            })
        );
        // A low configured maximum also caps the default.
        let short = Deadline {
            max_timeout_secs: 10,
        };
        assert_eq!(short.end_at(NOW, None), Ok(UnixMillis(1_010_000)));
    }

    #[test]
    fn set_timeout_may_shorten_but_extend_and_refresh_do_not() {
        let d = Deadline::default();
        let far = UnixMillis(5_000_000);
        assert_eq!(d.set_timeout(NOW, 10), Ok(UnixMillis(1_010_000)));
        assert_eq!(d.extend(NOW, far, Some(10)), Ok(far));
        assert_eq!(d.extend(NOW, NOW, Some(10)), Ok(UnixMillis(1_010_000)));
        assert_eq!(d.refresh(NOW, far, Some(10)), Ok(far));
        // Refreshes add at least 15 s.
        assert_eq!(d.refresh(NOW, NOW, Some(1)), Ok(UnixMillis(1_015_000)));
        assert_eq!(d.refresh(NOW, NOW, None), Ok(UnixMillis(1_015_000)));
        assert_eq!(
            d.refresh(NOW, NOW, Some(3601)),
            Err(TimeoutError::BadRefresh(3601))
        );
        assert_eq!(
            d.refresh(NOW, NOW, Some(-5)),
            Err(TimeoutError::BadRefresh(-5))
        );
    }

    #[test]
    fn arithmetic_saturates_and_backstop_adds_grace() {
        assert_eq!(UnixMillis(i64::MAX - 1).plus_secs(10), UnixMillis(i64::MAX));
        assert_eq!(backstop(NOW, 60), UnixMillis(1_060_000));
    }
}
