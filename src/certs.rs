//! `granary cert`: a development CA and node certificates, written as the
//! PEM files a node's `tls` section names (`granary_cluster::tls`).
//!
//! 1. `ca.pem` and `ca-key.pem` in the folder are the CA. If both are
//!    there they are used (to add nodes to a cluster); otherwise a new CA
//!    is made. One without the other is an error, not a new CA.
//! 2. Each name gets `NAME.pem` and `NAME-key.pem`, written anew. A name
//!    is the IP address the node listens on (a silo is known to its peers
//!    by the address it bound), or a host name for tools that dial by
//!    name; one that TLS cannot check (`10.0.0.5:7000`, `[::1]`, a name
//!    with spaces) or whose files would be the CA's is refused before
//!    anything is written.
//! 3. Every key file is written mode 0600, through `write_private`; the
//!    folder is made mode 0700 if it is new.

use std::path::{Path, PathBuf};

use granary_cluster::tls::certs::CertAuthority;

use crate::node_file::{NodeRunError, TlsFile, write_private};

/// What `write_certs` wrote: the CA's certificate, and each node's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// Whether the CA was made now (rule 1).
    pub new_ca: bool,
    /// The CA's certificate.
    pub ca: PathBuf,
    /// Each name's files, as a node's `tls` section names them.
    pub nodes: Vec<(String, TlsFile)>,
}

/// Whether TLS can check `name` (rule 2).
fn rustls_name(name: &str) -> Option<()> {
    granary_cluster::tls::check_name(name).ok()
}

/// A name as a file name: letters, digits, `.` and `-` kept, the rest `_`.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> NodeRunError + '_ {
    move |err| NodeRunError(format!("{}: {err}", path.display()))
}

/// Writes the CA (rule 1) and a certificate for each of `names` (rule 2)
/// into `dir`.
pub fn write_certs(dir: &Path, names: &[String]) -> Result<CertFiles, NodeRunError> {
    if names.is_empty() {
        return Err(NodeRunError(
            "name at least one node: the IP address it listens on".into(),
        ));
    }
    // Every file this writes, by its name folded to lower case (a
    // case-insensitive file system holds one of `A.pem` and `a.pem`), and
    // whose it is: no name's files may be another's or the CA's.
    let mut files: std::collections::HashMap<String, Option<&String>> = [
        ("ca.pem".to_string(), None),
        ("ca-key.pem".to_string(), None),
    ]
    .into();
    for name in names {
        if rustls_name(name).is_none() {
            return Err(NodeRunError(format!(
                "{name:?}: not an IP address or host name TLS can check (no port, no brackets)"
            )));
        }
        let stem = file_stem(name).to_ascii_lowercase();
        for file in [format!("{stem}.pem"), format!("{stem}-key.pem")] {
            match files.insert(file.clone(), Some(name)) {
                None => {}
                Some(None) => {
                    return Err(NodeRunError(format!(
                        "{name:?}: its files would be the CA's (ca.pem, ca-key.pem)"
                    )));
                }
                Some(Some(other)) if other == name => {
                    return Err(NodeRunError(format!("{name:?} is named twice")));
                }
                Some(Some(other)) => {
                    return Err(NodeRunError(format!(
                        "{name:?} and {other:?} would both write {file}: name one of them \
                         differently"
                    )));
                }
            }
        }
    }
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(io_error(dir))?;
    }
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (ca, new_ca) = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let cert = std::fs::read_to_string(&ca_cert).map_err(io_error(&ca_cert))?;
            let key = std::fs::read_to_string(&ca_key).map_err(io_error(&ca_key))?;
            let ca = CertAuthority::from_pem(&cert, &key)
                .map_err(|err| NodeRunError(format!("{}: {err}", ca_cert.display())))?;
            (ca, false)
        }
        (false, false) => {
            let ca = CertAuthority::generate().map_err(|err| NodeRunError(err.to_string()))?;
            write_private(&ca_key, &ca.key_pem()).map_err(io_error(&ca_key))?;
            if let Err(err) = std::fs::write(&ca_cert, ca.cert_pem()) {
                // A key alone would make every later run refuse the
                // folder ("found only one of them").
                let _ = std::fs::remove_file(&ca_key);
                let _ = std::fs::remove_file(&ca_cert);
                return Err(io_error(&ca_cert)(err));
            }
            (ca, true)
        }
        _ => {
            return Err(NodeRunError(format!(
                "{}: ca.pem and ca-key.pem go together; found only one of them",
                dir.display()
            )));
        }
    };
    let mut nodes = Vec::new();
    for name in names {
        let issued = ca
            .issue(std::slice::from_ref(name))
            .map_err(|err| NodeRunError(format!("{name}: {err}")))?;
        let stem = file_stem(name);
        let files = TlsFile {
            ca: ca_cert.clone(),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        };
        write_private(&files.key, &issued.key_pem).map_err(io_error(&files.key))?;
        std::fs::write(&files.cert, &issued.cert_pem).map_err(io_error(&files.cert))?;
        nodes.push((name.clone(), files));
    }
    Ok(CertFiles {
        new_ca,
        ca: ca_cert,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_made_once_and_signs_every_later_node() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("a folder");
        let certs = dir.path().join("certs");
        let first = write_certs(&certs, &["127.0.0.1".into(), "::1".into()])
            .expect("certificates are written");
        assert!(first.new_ca);
        assert_eq!(first.nodes[1].1.cert, certs.join("__1.pem"));
        let later =
            write_certs(&certs, &["node-3.example".into()]).expect("certificates are written");
        assert!(!later.new_ca);
        for (_, files) in first.nodes.iter().chain(&later.nodes) {
            let mode = std::fs::metadata(&files.key)
                .expect("written")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            granary_cluster::tls::TlsIdentity::load(&granary_cluster::tls::TlsFiles {
                ca: files.ca.clone(),
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
            .expect("the written files load as an identity");
        }
        let mode = std::fs::metadata(&certs)
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        for bad in ["10.0.0.5:7000", "[::1]", "bad name", "", "CA", "ca-key"] {
            assert!(write_certs(&certs, &[bad.to_string()]).is_err(), "{bad:?}");
        }
        // Two names whose files would be one file: refused before anything
        // is written (the second's certificate would overwrite the first's
        // key).
        for (first, second, why) in [
            ("node1", "node1-key", "would both write node1-key.pem"),
            ("Node1", "node1", "would both write node1.pem"),
            ("node1", "node1", "is named twice"),
        ] {
            let err =
                write_certs(&certs, &[first.to_string(), second.to_string()]).expect_err("refused");
            assert!(err.0.contains(why), "{first} {second}: {}", err.0);
            assert!(!certs.join("node1-key.pem").exists());
        }
        // Nothing of the CA was touched by the refusals.
        assert!(
            !write_certs(&certs, &["127.0.0.2".into()])
                .expect("certificates are written")
                .new_ca
        );
        std::fs::remove_file(certs.join("ca-key.pem")).expect("removed");
        assert!(write_certs(&certs, &["x".into()]).is_err());
        assert!(write_certs(&certs, &[]).is_err());
    }
}
