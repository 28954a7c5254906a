//! sip-profiles configuration (being written).
