//! Recordings, transcripts and call metadata: encrypted at rest, under each
//! tenant's retention policy. Pure selection rules (`retention`, judging
//! plain items it defines) beside the I/O that applies them (`db` implements
//! the `retention::RetentionStore` the sweeper works through); `time` holds
//! the unix-millisecond timestamps both count in.

pub mod crypto;
pub mod db;
pub mod objects;
pub mod ops;
pub mod recording;
pub mod retention;
pub mod time;
