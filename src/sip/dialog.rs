//! SIP dialogs (RFC 3261 §12): the state two user agents share after an INVITE
//! is answered — Call-ID, tags, CSeq counters, the route set and the remote
//! target — and the building of in-dialog requests from it.
//!
//! Owns: dialog identity and matching, CSeq ordering, Record-Route → route set,
//! Contact → remote target, request construction (BYE, re-INVITE, UPDATE, ACK).
//! Must not touch: transactions (retransmission is `transaction`'s job), sockets,
//! clocks. Both sides of dialog creation: the UAS side for calls carriers send
//! us ([`Dialog::new_uas`]), the UAC side for the calls we place
//! ([`Dialog::new_uac`], from our INVITE and the 2xx that answered it).

use crate::sip::error::SipError;
use crate::sip::message::{CSeq, Headers, Method, NameAddr, Request, Response, Uri, Via};
use bytes::Bytes;

/// The dialog state held by the UAS for one call.
#[derive(Debug, Clone)]
pub struct Dialog {
    /// Call-ID of the dialog.
    pub call_id: String,
    /// Our tag (To tag in requests from the peer).
    pub local_tag: String,
    /// The peer's tag (From tag of the INVITE); RFC 2543 peers may send none.
    pub remote_tag: Option<String>,
    /// Our URI (the To of the INVITE), without tag.
    pub local_uri: NameAddr,
    /// The peer's URI (the From of the INVITE), without tag.
    pub remote_uri: NameAddr,
    /// Where in-dialog requests go: the peer's Contact.
    pub remote_target: Uri,
    /// Record-Route of the INVITE, in order (the UAS keeps the order as received).
    pub route_set: Vec<NameAddr>,
    /// Our CSeq counter for requests we send.
    pub local_seq: u32,
    /// The highest CSeq seen from the peer.
    pub remote_seq: u32,
}

impl Dialog {
    /// Creates the UAS side of a dialog from the INVITE we answer (RFC 3261 §12.1.1).
    pub fn new_uas(
        invite: &Request,
        local_tag: String,
        local_seq: u32,
    ) -> Result<Dialog, SipError> {
        let from = invite.from().map_err(SipError::from)?;
        let mut to = invite.to().map_err(SipError::from)?;
        to.params.remove("tag");
        let remote_tag = from.tag().map(str::to_owned);
        let mut remote_uri = from;
        remote_uri.params.remove("tag");
        let remote_target = match invite
            .contacts()
            .map_err(SipError::from)?
            .into_iter()
            .next()
        {
            Some(contact) => contact.uri,
            // RFC 2543 peers may omit Contact: fall back to the From URI.
            None => remote_uri.uri.clone(),
        };
        Ok(Dialog {
            call_id: invite.call_id().map_err(SipError::from)?.to_owned(),
            local_tag,
            remote_tag,
            local_uri: to,
            remote_uri,
            remote_target,
            route_set: invite.record_routes().map_err(SipError::from)?,
            local_seq,
            remote_seq: invite.cseq().map_err(SipError::from)?.seq,
        })
    }

    /// The dialog our INVITE created (RFC 3261 §12.1.2): `invite` as we sent
    /// it (its From carries our tag, its CSeq our first number), `ok` the 2xx
    /// that answered it (remote tag, Contact → remote target, Record-Route
    /// reversed → route set).
    pub fn new_uac(invite: &Request, ok: &Response) -> Result<Dialog, SipError> {
        let mut local_uri = invite.from().map_err(SipError::from)?;
        let local_tag = local_uri
            .tag()
            .map(str::to_owned)
            .ok_or_else(|| SipError::Malformed("our INVITE has no From tag".into()))?;
        local_uri.params.remove("tag");
        let mut remote_uri = ok.to().map_err(SipError::from)?;
        let remote_tag = remote_uri.tag().map(str::to_owned);
        remote_uri.params.remove("tag");
        let remote_target = match ok.contacts().map_err(SipError::from)?.into_iter().next() {
            Some(contact) => contact.uri,
            None => invite.uri.clone(),
        };
        let mut route_set = ok.record_routes().map_err(SipError::from)?;
        route_set.reverse();
        Ok(Dialog {
            call_id: invite.call_id().map_err(SipError::from)?.to_owned(),
            local_tag,
            remote_tag,
            local_uri,
            remote_uri,
            remote_target,
            route_set,
            local_seq: invite.cseq().map_err(SipError::from)?.seq,
            remote_seq: 0,
        })
    }

    /// Whether an in-dialog request from the peer belongs to this dialog
    /// (Call-ID, To tag = ours, From tag = theirs).
    pub fn matches(&self, req: &Request) -> bool {
        let Ok(call_id) = req.call_id() else {
            return false;
        };
        if call_id != self.call_id {
            return false;
        }
        let to_ok = req
            .to()
            .ok()
            .is_some_and(|to| to.tag() == Some(self.local_tag.as_str()));
        let from_ok = req
            .from()
            .ok()
            .is_some_and(|from| from.tag() == self.remote_tag.as_deref());
        to_ok && from_ok
    }

    /// Records the CSeq of a new in-dialog request from the peer. A lower or
    /// equal CSeq than the last one is out of order (RFC 3261 §12.2.2: 500).
    pub fn accept_remote_cseq(&mut self, seq: u32) -> Result<(), SipError> {
        if seq <= self.remote_seq {
            return Err(SipError::ServerInternal);
        }
        self.remote_seq = seq;
        Ok(())
    }

    /// A target refresh (re-INVITE, UPDATE) may change the remote target.
    pub fn refresh_target(&mut self, req: &Request) {
        if let Ok(contacts) = req.contacts()
            && let Some(contact) = contacts.into_iter().next()
        {
            self.remote_target = contact.uri;
        }
    }

    /// The URI of the next hop for requests we send: the first route if the
    /// route set is loose-routed, else the remote target. The transport layer
    /// resolves it to an address.
    pub fn next_hop(&self) -> &Uri {
        match self.route_set.first() {
            Some(route) => &route.uri,
            None => &self.remote_target,
        }
    }

    fn local_with_tag(&self) -> NameAddr {
        let mut local = self.local_uri.clone();
        local.params.set("tag", Some(&self.local_tag));
        local
    }

    fn remote_with_tag(&self) -> NameAddr {
        let mut remote = self.remote_uri.clone();
        if let Some(tag) = &self.remote_tag {
            remote.params.set("tag", Some(tag));
        }
        remote
    }

    /// Builds a new in-dialog request (RFC 3261 §12.2.1.1), taking the next
    /// local CSeq. `via` is our Via with a fresh branch; `contact` our Contact.
    pub fn new_request(&mut self, method: Method, via: &Via, contact: &NameAddr) -> Request {
        self.local_seq = self.local_seq.wrapping_add(1).max(1);
        self.build(method, self.local_seq, via, Some(contact))
    }

    /// Builds the ACK for a 2xx to our re-INVITE with CSeq number `seq`
    /// (RFC 3261 §13.2.2.4: a new transaction, same CSeq number).
    pub fn ack(&self, seq: u32, via: &Via) -> Request {
        self.build(Method::Ack, seq, via, None)
    }

    fn build(&self, method: Method, seq: u32, via: &Via, contact: Option<&NameAddr>) -> Request {
        // Loose routing (RFC 3261 §12.2.1.1): with an `lr` first route, the
        // Request-URI is the remote target and the whole route set goes into
        // Route. A strict router gets the Request-URI and the target last.
        let (uri, routes): (Uri, Vec<String>) = match self.route_set.first() {
            Some(first) if !first.uri.params.has("lr") => {
                let mut routes: Vec<String> = self.route_set[1..]
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                routes.push(format!("<{}>", self.remote_target));
                (first.uri.clone(), routes)
            }
            _ => (
                self.remote_target.clone(),
                self.route_set.iter().map(ToString::to_string).collect(),
            ),
        };
        let mut headers = Headers::default();
        headers.push("Via", via.to_string());
        headers.push("Max-Forwards", "70");
        for route in routes {
            headers.push("Route", route);
        }
        headers.push("From", self.local_with_tag().to_string());
        headers.push("To", self.remote_with_tag().to_string());
        headers.push("Call-ID", self.call_id.clone());
        headers.push(
            "CSeq",
            CSeq {
                seq,
                method: method.clone(),
            }
            .to_string(),
        );
        if let Some(contact) = contact {
            headers.push("Contact", contact.to_string());
        }
        Request {
            method,
            uri,
            headers,
            body: Bytes::new(),
        }
    }

    /// Adds our tag to the To header of a response we send in this dialog.
    pub fn tag_response(&self, resp: &mut Response) {
        resp.headers.set("To", self.local_with_tag().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{Message, parse_datagram};

    const INVITE: &[u8] = b"INVITE sip:+15550001111@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport\r\n\
Record-Route: <sip:10.0.0.1;lr>, <sip:10.0.0.2;lr>\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:+15551112222@127.0.0.1>;tag=abc\r\n\
To: <sip:+15550001111@127.0.0.1>\r\n\
Call-ID: call-1@127.0.0.1\r\n\
CSeq: 10 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

    fn invite() -> Request {
        match parse_datagram(INVITE) {
            Ok(Message::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn via() -> Via {
        Via::parse("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-ours").unwrap()
    }

    #[test]
    fn uas_dialog_takes_tags_routes_and_target() {
        let d = Dialog::new_uas(&invite(), "ourtag".into(), 100).unwrap();
        assert_eq!(d.call_id, "call-1@127.0.0.1");
        assert_eq!(d.remote_tag.as_deref(), Some("abc"));
        assert_eq!(d.route_set.len(), 2);
        assert_eq!(d.remote_target.to_string(), "sip:alice@127.0.0.1:5070");
        assert_eq!(d.remote_seq, 10);
        assert_eq!(d.next_hop().to_string(), "sip:10.0.0.1;lr");
    }

    #[test]
    fn bye_carries_routes_tags_and_next_cseq() {
        let mut d = Dialog::new_uas(&invite(), "ourtag".into(), 100).unwrap();
        let contact = NameAddr::parse("<sip:bridge@127.0.0.1:5060>").unwrap();
        let bye = d.new_request(Method::Bye, &via(), &contact);
        let bytes = bye.encode();
        let Ok(Message::Request(bye)) = parse_datagram(&bytes) else {
            panic!("re-parse")
        };
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.uri.to_string(), "sip:alice@127.0.0.1:5070");
        let routes: Vec<&str> = bye.headers.values("Route").collect();
        assert_eq!(routes, vec!["<sip:10.0.0.1;lr>", "<sip:10.0.0.2;lr>"]);
        assert_eq!(bye.from().unwrap().tag(), Some("ourtag"));
        assert_eq!(bye.to().unwrap().tag(), Some("abc"));
        assert_eq!(bye.cseq().unwrap().seq, 101);
        assert_eq!(bye.cseq().unwrap().method, Method::Bye);
    }

    #[test]
    fn strict_route_puts_target_last() {
        let raw = String::from_utf8(INVITE.to_vec())
            .unwrap()
            .replace("<sip:10.0.0.1;lr>", "<sip:10.0.0.1>");
        let Ok(Message::Request(inv)) = parse_datagram(raw.as_bytes()) else {
            panic!()
        };
        let mut d = Dialog::new_uas(&inv, "t".into(), 1).unwrap();
        let contact = NameAddr::parse("<sip:bridge@127.0.0.1>").unwrap();
        let bye = d.new_request(Method::Bye, &via(), &contact);
        assert_eq!(bye.uri.to_string(), "sip:10.0.0.1");
        let routes: Vec<&str> = bye.headers.values("Route").collect();
        assert_eq!(
            routes,
            vec!["<sip:10.0.0.2;lr>", "<sip:alice@127.0.0.1:5070>"]
        );
    }

    #[test]
    fn matching_and_cseq_order() {
        let mut d = Dialog::new_uas(&invite(), "ourtag".into(), 1).unwrap();
        let raw = String::from_utf8(INVITE.to_vec())
            .unwrap()
            .replace("INVITE sip", "BYE sip")
            .replace("10 INVITE", "11 BYE")
            .replace(
                "To: <sip:+15550001111@127.0.0.1>",
                "To: <sip:+15550001111@127.0.0.1>;tag=ourtag",
            );
        let Ok(Message::Request(bye)) = parse_datagram(raw.as_bytes()) else {
            panic!()
        };
        assert!(d.matches(&bye));
        assert!(!d.matches(&invite()), "no To tag: not in this dialog");
        assert!(d.accept_remote_cseq(11).is_ok());
        assert!(matches!(
            d.accept_remote_cseq(11),
            Err(SipError::ServerInternal)
        ));
    }
}
