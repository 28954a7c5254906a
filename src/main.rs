//! The `sipbridge` command line (being written).
fn main() {}
