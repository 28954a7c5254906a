//! Recordings, transcripts and call metadata: encrypted at rest, under each
//! tenant's retention policy. Pure selection rules (`retention`) beside the
//! I/O that applies them.

pub mod crypto;
pub mod db;
pub mod ops;
pub mod recording;
pub mod retention;
