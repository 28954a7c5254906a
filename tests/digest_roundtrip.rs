#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Digest challenge → answer through the public API only, as a trunk would
//! do it, plus property tests: hostile header values never panic.

use std::time::Duration;

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sipbridge::sip::digest::{
    Algorithm, DigestCredentials, DigestError, DigestServer, ResponseParams, compute_response,
};

const NOW: u64 = 1_700_000_000;
const URI: &str = "sip:+442071234567@sip.bridge.example;transport=udp";

/// What a UAC does with one challenge value: reads realm/nonce/algorithm
/// with our own credentials parser (the grammar is the same) and answers.
fn answer_challenge(challenge: &str, user: &str, password: &[u8], nc: &str) -> String {
    // A challenge has no username/uri/response: add them so it parses.
    let c =
        DigestCredentials::parse(&format!("{challenge}, username=x, uri=x, response=x")).unwrap();
    let alg = match c.algorithm.as_deref() {
        Some("SHA-256") => Algorithm::Sha256,
        Some("MD5") | None => Algorithm::Md5,
        other => panic!("unexpected algorithm {other:?}"),
    };
    assert_eq!(c.qop.as_deref(), Some("auth"));
    let response = compute_response(
        alg,
        &ResponseParams {
            username: user,
            realm: &c.realm,
            password,
            method: "INVITE",
            uri: URI,
            nonce: &c.nonce,
            nc,
            cnonce: "c1c2c3",
            qop: "auth",
        },
    );
    format!(
        "Digest username=\"{user}\",realm=\"{}\",nonce=\"{}\",uri=\"{URI}\",\
         response=\"{response}\",algorithm={},cnonce=\"c1c2c3\",qop=auth,nc={nc}",
        c.realm,
        c.nonce,
        alg.as_str()
    )
}

#[test]
fn challenge_answer_round_trip_for_each_offered_algorithm() {
    let mut server = DigestServer::new("sip.bridge.example", [42; 32], Duration::from_secs(60));
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let challenges = server.challenge(NOW, &mut rng, false);
    assert!(challenges[0].contains("algorithm=SHA-256"));
    assert!(challenges[1].contains("algorithm=MD5"));
    for challenge in &challenges {
        let auth = answer_challenge(challenge, "pbx7", b"hunter2", "00000001");
        let creds = DigestCredentials::parse(&auth).unwrap();
        assert_eq!(creds.username, "pbx7");
        // Both challenges share one nonce, so the second answer needs nc 2.
        let result = server.verify_credentials(&creds, "INVITE", URI, "pbx7", b"hunter2", NOW + 1);
        if challenge.contains("SHA-256") {
            assert_eq!(result, Ok(()));
        } else {
            assert_eq!(result, Err(DigestError::ReplayedNonceCount));
            let auth = answer_challenge(challenge, "pbx7", b"hunter2", "00000002");
            assert_eq!(
                server.verify(&auth, "INVITE", URI, "pbx7", b"hunter2", NOW + 1),
                Ok(())
            );
        }
    }
}

#[test]
fn stale_then_rechallenge_succeeds() {
    let mut server = DigestServer::new("sip.bridge.example", [42; 32], Duration::from_secs(60));
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let old = &server.challenge(NOW, &mut rng, false)[0];
    let auth = answer_challenge(old, "pbx7", b"hunter2", "00000001");
    let err = server
        .verify(&auth, "INVITE", URI, "pbx7", b"hunter2", NOW + 61)
        .unwrap_err();
    assert_eq!(err, DigestError::StaleNonce);
    assert!(err.is_stale());
    let fresh = &server.challenge(NOW + 61, &mut rng, err.is_stale())[0];
    assert!(fresh.ends_with(", stale=true"));
    let auth = answer_challenge(fresh, "pbx7", b"hunter2", "00000001");
    assert_eq!(
        server.verify(&auth, "INVITE", URI, "pbx7", b"hunter2", NOW + 62),
        Ok(())
    );
}

fn param() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("username"),
        Just("realm"),
        Just("nonce"),
        Just("uri"),
        Just("response"),
        Just("algorithm"),
        Just("cnonce"),
        Just("nc"),
        Just("qop"),
        Just("x-foo"),
    ];
    let value = prop_oneof![
        "[ -~]{0,20}".prop_map(|v| format!("\"{v}\"")),
        "[!-~]{0,12}",
        Just("\"unterminated".to_owned()),
        Just("\"esc\\\"aped\"".to_owned()),
    ];
    (name, "[ \t\r\n]{0,2}", value).prop_map(|(n, ws, v)| format!("{n}{ws}={ws}{v}"))
}

proptest! {
    #[test]
    fn arbitrary_strings_never_panic(s in "\\PC{0,300}") {
        let _ = DigestCredentials::parse(&s);
        let mut server = DigestServer::new("r", [1; 32], Duration::from_secs(60));
        let _ = server.verify(&s, "INVITE", URI, "u", b"p", NOW);
        let digest = format!("Digest {s}");
        let r = server.verify(&digest, "INVITE", URI, "u", b"p", NOW);
        prop_assert!(r.is_err());
    }

    #[test]
    fn param_soup_never_panics_or_passes(params in proptest::collection::vec(param(), 0..12), sep in "[ ,\t]{1,3}") {
        let header = format!("Digest {}", params.join(&sep));
        let mut server = DigestServer::new("r", [1; 32], Duration::from_secs(60));
        // Nonces are never ours here, so nothing may pass.
        prop_assert!(server.verify(&header, "INVITE", URI, "u", b"p", NOW).is_err());
    }
}
