//! Where a response goes (RFC 3261 §18.2.2, RFC 3581 §4) — sans-IO.
//!
//! Owns: the choice of the destination address of a response from the
//! request's top Via and the address the request really came from. The
//! caller keeps the transport and, for a stream, the connection the request
//! arrived on (§18.2.2: a response goes back over it; the address chosen here
//! is only used to open a new connection when that one has closed).
//! Must not touch: sockets, DNS (a sent-by that is a name falls back to the
//! source address, which `received` also names for such a request).

use super::message::Via;
use std::net::{IpAddr, SocketAddr};

/// The default port of a Via transport (RFC 3261 §18.2.2 "port 5060 if none
/// is present"; 5061 for TLS, RFC 3261 §26.2).
fn default_port(via: &Via) -> u16 {
    if via.transport.eq_ignore_ascii_case("TLS") {
        5061
    } else {
        5060
    }
}

/// An IP written as a Via parameter value: `maddr` may be a bare or a
/// bracketed IPv6 address (RFC 5118 §4.5).
fn param_ip(value: &str) -> Option<IpAddr> {
    let v = value.trim();
    let v = v
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(v);
    v.parse().ok()
}

/// The address a response to a request with top Via `via`, received from
/// `source`, is sent to:
///
/// 1. a multicast `maddr`, with the sent-by port (or the default);
/// 2. else `source`'s IP — what the `received` parameter names once the
///    switchboard has stamped it (§18.2.1) — with the `rport` value when the
///    request asked for it (RFC 3581 §4), else the sent-by port, else the
///    default port.
///
/// The IP is never taken from the Via as written: the switchboard leaves a
/// Via alone when its sent-by is the source and it asks for no `rport`, so a
/// `received=` the sender wrote itself would survive and point our responses
/// at a third party (a reflection attack). A unicast `maddr` is ignored for
/// the same reason.
pub fn response_addr(via: &Via, source: SocketAddr) -> SocketAddr {
    let sent_by_port = via.port.unwrap_or_else(|| default_port(via));
    if let Some(maddr) = via.params.get("maddr").flatten().and_then(param_ip)
        && maddr.is_multicast()
    {
        return SocketAddr::new(maddr, sent_by_port);
    }
    let ip = source.ip();
    let port = match via.rport() {
        Some(Some(p)) if p != 0 => p,
        // Asked for but never filled in: the source port is what it asked for.
        Some(_) if ip == source.ip() => source.port(),
        _ => sent_by_port,
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(s: &str) -> Via {
        Via::parse(s).unwrap()
    }

    fn src(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn received_and_rport_win() {
        let v = via("SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bK1;received=127.0.0.2;rport=5082");
        assert_eq!(
            response_addr(&v, src("127.0.0.2:5082")),
            src("127.0.0.2:5082")
        );
    }

    #[test]
    fn rport_value_is_used_even_when_the_source_differs() {
        // The request came over another hop than the one that stamped it.
        let v = via("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;received=127.0.0.1;rport=5090");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:6000")),
            src("127.0.0.1:5090")
        );
    }

    #[test]
    fn without_rport_the_sent_by_port_is_used() {
        // RFC 3261 §18.2.2: received address, sent-by port.
        let v = via("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1;received=127.0.0.1");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:40000")),
            src("127.0.0.1:5070")
        );
        let v = via("SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bK1");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:40000")),
            src("127.0.0.1:5071")
        );
    }

    #[test]
    fn default_ports() {
        let v = via("SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:40000")),
            src("127.0.0.1:5060")
        );
        let v = via("SIP/2.0/TLS 127.0.0.1;branch=z9hG4bK1");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:40000")),
            src("127.0.0.1:5061")
        );
    }

    #[test]
    fn empty_rport_means_the_source_port() {
        let v = via("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:41000")),
            src("127.0.0.1:41000")
        );
    }

    #[test]
    fn a_name_without_received_falls_back_to_the_source_ip() {
        let v = via("SIP/2.0/UDP pbx.example.com:5070;branch=z9hG4bK1");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:41000")),
            src("127.0.0.1:5070")
        );
    }

    #[test]
    fn ipv6_received_bare_or_bracketed() {
        let v = via("SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bK1;received=::1;rport=5082");
        assert_eq!(response_addr(&v, src("[::1]:5082")), src("[::1]:5082"));
        let v = via("SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bK1;received=[::1]");
        assert_eq!(response_addr(&v, src("[::1]:5082")), src("[::1]:5070"));
    }

    #[test]
    fn maddr_only_when_multicast() {
        let v = via("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;maddr=239.255.255.1");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:5070")),
            src("239.255.255.1:5070")
        );
        // A unicast maddr could point responses at anyone: ignored.
        let v = via("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;maddr=127.0.0.9");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:5070")),
            src("127.0.0.1:5070")
        );
    }

    #[test]
    fn a_received_written_by_the_sender_is_not_followed() {
        // Sent-by is the source and no rport: nothing restamps this Via.
        let v = via("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;received=192.0.2.66");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:5070")),
            src("127.0.0.1:5070")
        );
    }

    #[test]
    fn garbage_received_is_ignored() {
        let v = via("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;received=nonsense");
        assert_eq!(
            response_addr(&v, src("127.0.0.1:5070")),
            src("127.0.0.1:5070")
        );
    }
}
