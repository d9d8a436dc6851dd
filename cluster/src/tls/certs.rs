//! Development certificates (rcgen): a cluster CA, and node certificates
//! it signs, for `granary cert` and for tests. A production cluster's CA
//! is whatever its operators run; these files have the same shape.
//!
//! 1. The CA is a self-signed ECDSA P-256 certificate named
//!    `granary cluster CA`, for signing certificates only, valid ten
//!    years. Its certificate and key are all it takes to sign more nodes
//!    later ([`CertAuthority::from_pem`]): the name is fixed, so the issuer
//!    is rebuilt from the key, and a certificate it signs is checked
//!    against the CA's certificate before the CA is used.
//! 2. A node certificate names each of the node's addresses or host names
//!    (an IP address or a DNS name among its subject alternative names,
//!    what `TlsTransport` checks: `tls/mod.rs` rule 2), serves both as a
//!    server and as a client (each silo is both), and is valid 825 days
//!    from an hour ago.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::TlsError;

/// The CA's name (rule 1).
const CA_NAME: &str = "granary cluster CA";
/// How long a CA is valid (rule 1).
const CA_VALID: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate is valid (rule 2).
const NODE_VALID: Duration = Duration::from_secs(825 * 24 * 3600);

fn generate(err: rcgen::Error) -> TlsError {
    TlsError::Generate(err.to_string())
}

/// A cluster's certificate authority.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

/// A node's certificate and private key, PEM.
#[derive(Clone)]
pub struct NodeCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (keep it mode 0600).
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<hidden>")
            .finish()
    }
}

impl CertAuthority {
    /// The CA's parameters: its name and use (rule 1).
    fn params() -> Result<CertificateParams, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, CA_NAME);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(params)
    }

    /// A new CA (rule 1).
    pub fn generate() -> Result<CertAuthority, TlsError> {
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertAuthority::params()?;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + CA_VALID).into();
        let cert = params.self_signed(&key).map_err(generate)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM), to sign more nodes. A key
    /// that is not the certificate's, or a certificate of another CA, is
    /// refused (rule 1).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertAuthority, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(generate)?;
        let ca = CertAuthority {
            cert_pem: cert_pem.to_string(),
            issuer: Issuer::new(CertAuthority::params()?, key),
        };
        let probe = ca.issue(&["probe.invalid".to_string()])?;
        super::verify_issued(
            cert_pem.as_bytes(),
            probe.cert_pem.as_bytes(),
            "probe.invalid",
        )
        .map_err(|why| {
            TlsError::Generate(format!(
                "this key and certificate are not a CA `granary cert` made, or not \
                 each other's ({why}); sign with the tools that made the CA"
            ))
        })?;
        Ok(ca)
    }

    /// The CA's certificate (what every node trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (keep it off the nodes).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for a node known as `names` (rule 2).
    pub fn issue(&self, names: &[String]) -> Result<NodeCert, TlsError> {
        let now = SystemTime::now();
        self.issue_valid(names, now - Duration::from_secs(3600), now + NODE_VALID)
    }

    /// A certificate for `names`, valid from `not_before` to `not_after`
    /// (tests make expired ones).
    pub fn issue_valid(
        &self,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<NodeCert, TlsError> {
        if names.is_empty() {
            return Err(TlsError::Generate(
                "a node certificate needs at least one address or host name".into(),
            ));
        }
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(generate)?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, names[0].clone());
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsIdentity;

    #[test]
    fn a_ca_signs_nodes_and_reloads_from_its_pem() {
        let ca = CertAuthority::generate().expect("a CA");
        let node = ca
            .issue(&["127.0.0.1".into(), "localhost".into()])
            .expect("a node certificate");
        TlsIdentity::from_pem(
            ca.cert_pem().as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )
        .expect("the CA's certificate, the node's chain and key make an identity");
        let again = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("the CA reloads");
        let other = again
            .issue(&["10.0.0.5".into()])
            .expect("a node certificate");
        TlsIdentity::from_pem(
            ca.cert_pem().as_bytes(),
            other.cert_pem.as_bytes(),
            other.key_pem.as_bytes(),
        )
        .expect("the CA's certificate, the node's chain and key make an identity");
        assert!(ca.issue(&[]).is_err());
        // Another CA's key with this CA's certificate is refused.
        let stranger = CertAuthority::generate().expect("a CA");
        assert!(CertAuthority::from_pem(ca.cert_pem(), &stranger.key_pem()).is_err());
        assert!(!format!("{node:?}").contains("PRIVATE"));
        // A key that is not the certificate's is refused.
        assert!(matches!(
            TlsIdentity::from_pem(
                ca.cert_pem().as_bytes(),
                node.cert_pem.as_bytes(),
                other.key_pem.as_bytes(),
            ),
            Err(TlsError::Config(_))
        ));
    }
}
