//! The store's private certificate authority, as in Box Backup: one CA per store,
//! a server certificate for the names the laptops use, and one client certificate
//! per account (its common name is the account). Revocation is a CRL that the
//! server re-reads when it changes.
//!
//! Files, under the store directory:
//!
//! | path | what | mode |
//! |---|---|---|
//! | `ca/ca.key`, `ca/ca.crt` | the CA's key and certificate | 0600, 0644 |
//! | `ca/issued.tsv` | serial (hex), account, not-after (Unix seconds), revoked (0/1) | 0644 |
//! | `ca/crl.pem` | the revocation list of revoked serials | 0644 |
//! | `server.key`, `server.crt` | the server's key and certificate | 0600, 0644 |

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::objects::check_account_name;

/// Everything that can go wrong with the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file of the CA could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// Key or certificate generation, parsing or signing failed.
    #[error("certificate operation failed ({what}): {source}")]
    Certificate {
        /// What was being done.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The store directory already has a CA.
    #[error("{} already holds a CA; Homing never replaces one (every laptop trusts it)", path.display())]
    Exists {
        /// The CA directory.
        path: PathBuf,
    },
    /// An account name that is not allowed.
    #[error(
        "invalid account name {0:?}: use 1 to 64 lower-case letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    InvalidAccount(String),
    /// Nothing matches what was to be revoked.
    #[error("no certificate was issued to account or serial {0:?}; see `homing-store ca list`")]
    NotIssued(String),
    /// The register of issued certificates is damaged.
    #[error("{}:{line}: {problem}", path.display())]
    Register {
        /// The register file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// One issued client certificate, as the register records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Its serial number, in hex.
    pub serial: String,
    /// The account (the certificate's common name).
    pub account: String,
    /// When it expires, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether it has been revoked.
    pub revoked: bool,
}

/// A client certificate and key, ready to hand to a laptop.
pub struct ClientCredentials {
    /// The serial number, in hex.
    pub serial: String,
    /// The private key (PEM). Absent when the laptop made its own (CSR flow).
    pub key_pem: Option<String>,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The CA certificate the laptop must trust (PEM).
    pub ca_pem: String,
}

/// The store's CA, opened from the store directory.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    cert_pem: String,
}

impl Ca {
    /// Creates the CA and the server certificate for `hostnames` and `ips` (at least
    /// `localhost` and 127.0.0.1 are always included, for a store on this machine).
    ///
    /// # Errors
    /// If a CA exists already, or generation or writing fails.
    pub fn create(store: &Path, hostnames: &[String], ips: &[IpAddr]) -> Result<Self, CaError> {
        let dir = store.join("ca");
        if dir.join("ca.key").exists() {
            return Err(CaError::Exists { path: dir });
        }
        fs::create_dir_all(&dir).map_err(|source| CaError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name("Homing store CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365 * 20);
        params.serial_number = Some(random_serial()?);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate().map_err(cert("generate the CA key"))?;
        let ca_cert = params
            .self_signed(&key)
            .map_err(cert("sign the CA certificate"))?;
        write_private(&dir.join("ca.key"), &key.serialize_pem())?;
        write_public(&dir.join("ca.crt"), &ca_cert.pem())?;
        write_public(&dir.join("issued.tsv"), "")?;
        let ca = Self {
            dir,
            key,
            cert_pem: ca_cert.pem(),
        };
        ca.write_crl(&[])?;

        let mut names: Vec<String> = hostnames.to_vec();
        if !names.iter().any(|n| n == "localhost") {
            names.push("localhost".into());
        }
        let mut ips = ips.to_vec();
        let loopback: IpAddr = [127, 0, 0, 1].into();
        if !ips.contains(&loopback) {
            ips.push(loopback);
        }
        let mut server = CertificateParams::new(names).map_err(cert("name the server"))?;
        server
            .subject_alt_names
            .extend(ips.into_iter().map(SanType::IpAddress));
        server.distinguished_name = name("Homing store");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.not_before = now - Duration::hours(1);
        server.not_after = now + Duration::days(365 * 5);
        server.serial_number = Some(random_serial()?);
        let server_key = KeyPair::generate().map_err(cert("generate the server key"))?;
        let server_cert = server
            .signed_by(&server_key, &ca.issuer()?)
            .map_err(cert("sign the server certificate"))?;
        write_private(&store.join("server.key"), &server_key.serialize_pem())?;
        write_public(&store.join("server.crt"), &server_cert.pem())?;
        Ok(ca)
    }

    /// Opens the CA of a store.
    ///
    /// # Errors
    /// If its files are missing or unreadable.
    pub fn open(store: &Path) -> Result<Self, CaError> {
        let dir = store.join("ca");
        let key =
            KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(cert("read the CA key"))?;
        let cert_pem = read(&dir.join("ca.crt"))?;
        Ok(Self { dir, key, cert_pem })
    }

    /// The CA certificate (PEM), which every client trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a key and certificate for `account`, valid for `days`.
    ///
    /// # Errors
    /// An invalid account name, or a failure to generate, sign or record.
    pub fn issue(&self, account: &str, days: u32) -> Result<ClientCredentials, CaError> {
        let key = KeyPair::generate().map_err(cert("generate the client key"))?;
        let (serial, cert_pem) = self.sign_client(account, days, &key)?;
        Ok(ClientCredentials {
            serial,
            key_pem: Some(key.serialize_pem()),
            cert_pem,
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Signs a laptop's certificate request for `account` (the air-gapped flow: the
    /// private key never leaves the laptop). The account comes from the operator,
    /// not from the request, whose subject is ignored.
    ///
    /// # Errors
    /// An invalid account name, an unparsable request, or a failure to sign.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        account: &str,
        days: u32,
    ) -> Result<ClientCredentials, CaError> {
        check_account(account)?;
        let mut request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(cert("parse the request"))?;
        let (serial, params) = client_params(account, days)?;
        request.params = params;
        let certificate = request
            .signed_by(&self.issuer()?)
            .map_err(cert("sign the request"))?;
        self.record(&serial, account, days)?;
        Ok(ClientCredentials {
            serial,
            key_pem: None,
            cert_pem: certificate.pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Revokes every certificate of `account`, or the one with serial `serial`
    /// (hex), and rewrites the CRL. Returns the serials revoked.
    ///
    /// # Errors
    /// Nothing issued matches, or the register or CRL cannot be written.
    pub fn revoke(&self, account_or_serial: &str) -> Result<Vec<String>, CaError> {
        let mut issued = self.issued()?;
        let matches = |e: &Issued| {
            e.account == account_or_serial || e.serial.eq_ignore_ascii_case(account_or_serial)
        };
        if !issued.iter().any(matches) {
            return Err(CaError::NotIssued(account_or_serial.to_string()));
        }
        let mut revoked = Vec::new();
        for entry in issued.iter_mut().filter(|e| matches(e) && !e.revoked) {
            entry.revoked = true;
            revoked.push(entry.serial.clone());
        }
        let mut text = String::new();
        for entry in &issued {
            let _ = writeln!(
                text,
                "{}\t{}\t{}\t{}",
                entry.serial,
                entry.account,
                entry.not_after,
                u8::from(entry.revoked)
            );
        }
        write_public(&self.dir.join("issued.tsv"), &text)?;
        let serials: Vec<String> = issued
            .iter()
            .filter(|e| e.revoked)
            .map(|e| e.serial.clone())
            .collect();
        self.write_crl(&serials)?;
        Ok(revoked)
    }

    /// Every certificate issued, as the register records it.
    ///
    /// # Errors
    /// If the register is unreadable or damaged (with file and line).
    pub fn issued(&self) -> Result<Vec<Issued>, CaError> {
        let path = self.dir.join("issued.tsv");
        let text = read(&path)?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                let bad = |problem: &str| CaError::Register {
                    path: path.clone(),
                    line: n + 1,
                    problem: problem.to_string(),
                };
                let fields: Vec<&str> = line.split('\t').collect();
                let [serial, account, not_after, revoked] = fields[..] else {
                    return Err(bad("expected 4 tab-separated fields"));
                };
                Ok(Issued {
                    serial: serial.to_string(),
                    account: account.to_string(),
                    not_after: not_after
                        .parse()
                        .map_err(|_| bad("not-after is not a number"))?,
                    revoked: match revoked {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad("revoked is neither 0 nor 1")),
                    },
                })
            })
            .collect()
    }

    fn sign_client(
        &self,
        account: &str,
        days: u32,
        key: &KeyPair,
    ) -> Result<(String, String), CaError> {
        check_account(account)?;
        let (serial, params) = client_params(account, days)?;
        let certificate = params
            .signed_by(key, &self.issuer()?)
            .map_err(cert("sign the client certificate"))?;
        self.record(&serial, account, days)?;
        Ok((serial, certificate.pem()))
    }

    fn record(&self, serial: &str, account: &str, days: u32) -> Result<(), CaError> {
        let not_after =
            (OffsetDateTime::now_utc() + Duration::days(i64::from(days))).unix_timestamp();
        let path = self.dir.join("issued.tsv");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                writeln!(f, "{serial}\t{account}\t{not_after}\t0")?;
                f.sync_all()
            })
            .map_err(|source| CaError::Io {
                action: "append to",
                path,
                source,
            })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(cert("load the CA certificate"))
    }

    fn write_crl(&self, serials: &[String]) -> Result<(), CaError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = serials
            .iter()
            .filter_map(|s| hex_bytes(s))
            .map(|bytes| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now,
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(365 * 20),
            crl_number: SerialNumber::from(now.unix_timestamp().unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer()?)
            .map_err(cert("sign the revocation list"))?;
        let pem = crl.pem().map_err(cert("encode the revocation list"))?;
        write_public(&self.dir.join("crl.pem"), &pem)
    }
}

fn client_params(account: &str, days: u32) -> Result<(String, CertificateParams), CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = name(account);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    let serial = random_serial()?;
    let hex: String = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    params.serial_number = Some(serial);
    Ok((hex, params))
}

fn check_account(account: &str) -> Result<(), CaError> {
    check_account_name(account).map_err(|_| CaError::InvalidAccount(account.to_string()))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// 16 random bytes with the top bit clear, so that the serial is positive.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0_u8; 16];
    fill_random(&mut bytes)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, so that DER keeps all 16 bytes
    Ok(SerialNumber::from_slice(&bytes))
}

fn fill_random(bytes: &mut [u8]) -> Result<(), CaError> {
    getrandom::fill(bytes).map_err(|e| CaError::Io {
        action: "draw random bytes from",
        path: "the operating system".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn cert(what: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |source| CaError::Certificate { what, source }
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    write_file(path, text, 0o644)
}

fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    write_file(path, text, 0o600)
}

/// Writes a file whole and durably: a temporary file, synced, then renamed.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let io = |action| {
        move |source| CaError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let temp = path.with_extension("tmp");
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&temp).map_err(io("create"))?;
    file.write_all(text.as_bytes()).map_err(io("write"))?;
    file.sync_all().map_err(io("sync"))?;
    fs::rename(&temp, path).map_err(io("rename into"))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync the directory of"))?;
    }
    Ok(())
}
