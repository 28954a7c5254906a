//! The store's timestamps: milliseconds since the Unix epoch, as every row
//! and every retention rule counts time. Pure: the wall-clock time is passed
//! in, never read here.

use std::time::SystemTime;

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMs = i64;

/// Converts a wall-clock time to [`UnixMs`] (times before 1970 clamp to 0).
pub fn unix_ms(t: SystemTime) -> UnixMs {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
