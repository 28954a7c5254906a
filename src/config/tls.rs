//! TLS material of SIP over TLS: the server's certificate chain and key, and
//! the per-trunk client CAs of mutual TLS, turned into `rustls` configurations.
//!
//! Owns: PEM parsing (through `rustls-pki-types`), the check that the chain and
//! key belong together (what `sipbridge check` reports), and the rustls
//! configurations the daemon's TLS listener and outbound TLS connections use
//! (ring provider: the project builds without OpenSSL or aws-lc). Must not do
//! I/O: the PEM bytes arrive as [`Secret`]s resolved by `validate`.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsIdentity;
use super::secret::Secret;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM bundle (at least one).
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle ({e})"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the PEM".to_owned());
    }
    Ok(certs)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no usable PEM private key ({e})"))
}

fn roots(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(pem)? {
        roots
            .add(c)
            .map_err(|e| format!("CA certificate rejected: {e}"))?;
    }
    Ok(roots)
}

/// A verifier that requires a client certificate signed by one of `ca_pem`'s CAs.
pub fn client_verifier(ca_pem: &[u8]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .build()
        .map_err(|e| format!("CA bundle unusable: {e}"))
}

/// The TLS listener's configuration. With `client_cas` (the CAs of trunks
/// that use mutual TLS) a client certificate is requested and verified when
/// presented, but not required: which trunk must present one is decided per
/// source address once the connection is up (see [`ClientAuth`]).
pub fn server_config(
    identity: &TlsIdentity,
    client_cas: &[&Secret],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = certificates(identity.cert.expose())?;
    let key = private_key(identity.key.expose())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if client_cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut all = rustls::RootCertStore::empty();
        for ca in client_cas {
            for c in certificates(ca.expose())? {
                all.add(c)
                    .map_err(|e| format!("CA certificate rejected: {e}"))?;
            }
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(all), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client CA bundle unusable: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not form a usable identity: {e}"))?;
    Ok(Arc::new(config))
}

/// The client configuration for outbound SIP over TLS (a request whose
/// connection has closed): the server's certificate must chain to the
/// Mozilla roots or to `extra_ca` (e.g. the trunk's private CA), and name the
/// address dialled.
pub fn client_config(extra_ca: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca {
        for c in certificates(pem)? {
            roots
                .add(c)
                .map_err(|e| format!("CA certificate rejected: {e}"))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Per-trunk mutual TLS: which source networks must present a client
/// certificate, and whose CA must have signed it.
#[derive(Clone, Default)]
pub struct ClientAuth {
    trunks: Vec<(String, Vec<ipnet::IpNet>, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.trunks.iter().map(|(name, _, _)| name))
            .finish()
    }
}

impl ClientAuth {
    /// From the trunks that set `tls_client_ca` (checked at load).
    pub fn new(trunks: &[super::Trunk]) -> ClientAuth {
        let trunks = trunks
            .iter()
            .filter_map(|t| {
                let ca = t.tls_client_ca.as_ref()?;
                let verifier = client_verifier(ca.expose()).ok()?;
                Some((t.name.clone(), t.allow.clone(), verifier))
            })
            .collect();
        ClientAuth { trunks }
    }

    /// Whether a TLS connection from `ip`, which presented `chain` (leaf
    /// first; empty: none), may go on. A source inside the allow-list of a
    /// mutual-TLS trunk needs a certificate that trunk's CA signed; other
    /// sources need none. `now` is the validity check's time.
    pub fn permits(
        &self,
        ip: std::net::IpAddr,
        chain: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<(), String> {
        for (name, allow, verifier) in &self.trunks {
            if !allow.iter().any(|n| n.contains(&ip)) {
                continue;
            }
            let Some((leaf, rest)) = chain.split_first() else {
                return Err(format!("trunk `{name}` requires a client certificate"));
            };
            verifier
                .verify_client_cert(leaf, rest, now)
                .map_err(|e| format!("trunk `{name}`: client certificate rejected: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretRef;

    fn identity(names: &[&str]) -> (TlsIdentity, String) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        let cert_pem = ck.cert.pem();
        (
            TlsIdentity {
                cert: Secret::new(cert_pem.clone().into_bytes(), SecretRef::Inline),
                key: Secret::new(
                    ck.signing_key.serialize_pem().into_bytes(),
                    SecretRef::Inline,
                ),
                outbound_ca: None,
            },
            cert_pem,
        )
    }

    #[test]
    fn matching_chain_and_key_make_a_server_config() {
        let (id, _) = identity(&["localhost"]);
        assert!(server_config(&id, &[]).is_ok());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (a, _) = identity(&["a.example"]);
        let (b, _) = identity(&["b.example"]);
        let mixed = TlsIdentity {
            cert: a.cert,
            key: b.key,
            outbound_ca: None,
        };
        let err = server_config(&mixed, &[]).unwrap_err();
        assert!(err.contains("do not form a usable identity"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let (id, _) = identity(&["localhost"]);
        let bad = TlsIdentity {
            cert: Secret::new(b"hello".to_vec(), SecretRef::Inline),
            key: id.key,
            outbound_ca: None,
        };
        let err = server_config(&bad, &[]).unwrap_err();
        assert!(err.contains("CERTIFICATE"), "{err}");
    }
}
