//! How a node reaches PostgreSQL: the connection URL, with libpq's `sslmode` and
//! `sslrootcert` read here (tokio-postgres knows only `disable`, `prefer` and
//! `require`, and checks nothing), and TLS on rustls (tokio-postgres-rustls).
//!
//! The modes mean what they mean to libpq (and `psql`), default `prefer`:
//! - `disable`: plain TCP;
//! - `prefer`: TLS if the server offers it, plain otherwise; the certificate is not
//!   checked;
//! - `require`: TLS or no connection; the certificate is not checked, unless a root
//!   certificate is given (`sslrootcert`, or `~/.postgresql/root.crt` exists), when it
//!   is checked as for `verify-ca` (libpq does the same);
//! - `verify-ca`: TLS, and the certificate must chain to a root of `sslrootcert`;
//! - `verify-full`: as `verify-ca`, and the certificate must name the host connected
//!   to. What to use across any network you do not own.
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the Mozilla roots
//! (`webpki-roots`, as managed services' certificates chain to); `system` implies
//! `verify-full` and refuses a weaker mode, as libpq does.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use tokio_postgres::config::SslMode as DriverMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, StoreError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(invalid(format!(
                    "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// Where the CA certificates come from.
enum Roots {
    /// None given, and no `~/.postgresql/root.crt`.
    None,
    /// `sslrootcert=system`: the Mozilla roots.
    System,
    /// A PEM file.
    File(String),
}

fn invalid(why: String) -> StoreError {
    StoreError::Db(format!("invalid database URL: {why}"))
}

/// The driver's configuration for `url` and the TLS connector to use with it.
pub(super) fn connect_config(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    let (rest, mode, root_cert) = take_tls_params(url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| invalid(format!("{e}")))?;
    let roots = match root_cert.as_deref() {
        Some("system") => Roots::System,
        Some(path) => Roots::File(path.to_string()),
        None => match default_root_cert() {
            Some(path) => Roots::File(path),
            None => Roots::None,
        },
    };
    let mode = match (mode, &roots) {
        (None, Roots::System) => SslMode::VerifyFull,
        (Some(mode), Roots::System) if mode != SslMode::VerifyFull => {
            return Err(invalid(format!(
                "sslrootcert=system needs sslmode=verify-full, not {mode:?}"
            )));
        }
        (None, _) => SslMode::Prefer,
        (Some(SslMode::Require), Roots::File(_)) => SslMode::VerifyCa,
        (Some(mode), _) => mode,
    };
    config.ssl_mode(match mode {
        SslMode::Disable => DriverMode::Disable,
        SslMode::Prefer => DriverMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverMode::Require,
    });
    Ok((config, MakeRustlsConnect::new(client_config(mode, &roots)?)))
}

/// `url` without `sslmode` and `sslrootcert`, which this module reads itself, and
/// their values. A URL (`postgres://…?sslmode=…`) or libpq's `key=value` words.
fn take_tls_params(url: &str) -> Result<(String, Option<SslMode>, Option<String>), StoreError> {
    let (mut mode, mut root_cert) = (None, None);
    let mut take = |key: &str, value: &str| -> Result<bool, StoreError> {
        match key {
            "sslmode" => mode = Some(SslMode::parse(value)?),
            "sslrootcert" => root_cert = Some(value.to_string()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let mut kept = Vec::new();
        for (key, value) in parsed.query_pairs() {
            if !take(&key, &value)? {
                kept.push((key.into_owned(), value.into_owned()));
            }
        }
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok((parsed.to_string(), mode, root_cert))
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            let taken = match word.split_once('=') {
                Some((key, value)) => take(key.trim(), value.trim_matches('\''))?,
                None => false,
            };
            if !taken {
                kept.push(word);
            }
        }
        Ok((kept.join(" "), mode, root_cert))
    }
}

/// libpq's default root certificate file, if it exists.
fn default_root_cert() -> Option<String> {
    let home = std::env::var_os("HOME")?;
    let path = std::path::Path::new(&home).join(".postgresql/root.crt");
    path.exists().then(|| path.display().to_string())
}

fn client_config(mode: SslMode, roots: &Roots) -> Result<ClientConfig, StoreError> {
    let tls_error = |e: rustls::Error| invalid(format!("TLS: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let verified = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
    if !verified {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls::AnyCertificate(provider)))
            .with_no_client_auth());
    }
    let mut store = RootCertStore::empty();
    match roots {
        Roots::None => {
            return Err(invalid(format!(
                "sslmode={} needs sslrootcert: the CA certificate(s) of the server, as a PEM \
                 file, or `system` for the public roots",
                if mode == SslMode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                }
            )));
        }
        Roots::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::File(path) => {
            for cert in
                crate::tls::load_pem_certificates(path).map_err(|e| invalid(format!("sslrootcert {e}")))?
            {
                store.add(cert).map_err(tls_error)?;
            }
        }
    }
    let builder = if mode == SslMode::VerifyFull {
        builder.with_root_certificates(store)
    } else {
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls::AnyName(verifier)))
    };
    Ok(builder.with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modes(url: &str) -> (String, Option<SslMode>, Option<String>) {
        take_tls_params(url).unwrap()
    }

    /// The refusal `connect_config` gives for `url`.
    fn refusal(url: &str) -> String {
        match connect_config(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_tls_parameters_are_taken_out_of_a_url_and_the_rest_kept() {
        let (rest, mode, root) = modes(
            "postgres://u:p%40ss@db.example.com:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        );
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(mode, Some(SslMode::VerifyFull));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, root) = modes("postgres://db/app?sslmode=require");
        assert_eq!(rest, "postgres://db/app");
        assert_eq!((mode, root), (Some(SslMode::Require), None));
        let (rest, mode, _) = modes("host=db dbname=app sslmode=disable user=u");
        assert_eq!(rest, "host=db dbname=app user=u");
        assert_eq!(mode, Some(SslMode::Disable));
    }

    #[test]
    fn a_mode_libpq_does_not_know_or_a_verification_without_a_ca_is_refused_by_name() {
        let e = refusal("postgres://db/app?sslmode=verify");
        assert!(e.contains("sslmode=verify: expected disable, prefer"), "{e}");
        // (Only where ~/.postgresql/root.crt does not exist, as on CI.)
        if default_root_cert().is_none() {
            let e = refusal("postgres://db/app?sslmode=verify-full");
            assert!(e.contains("sslmode=verify-full needs sslrootcert"), "{e}");
        }
        let e = refusal("postgres://db/app?sslmode=require&sslrootcert=system");
        assert!(e.contains("sslrootcert=system needs sslmode=verify-full"), "{e}");
        let e = refusal("postgres://db/app?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_driver_is_told_to_require_tls_for_every_verifying_mode() {
        let mode = |url: &str| connect_config(url).unwrap().0.get_ssl_mode();
        assert_eq!(mode("postgres://db/app"), DriverMode::Prefer);
        assert_eq!(mode("postgres://db/app?sslmode=disable"), DriverMode::Disable);
        assert_eq!(mode("postgres://db/app?sslmode=require"), DriverMode::Require);
        assert_eq!(mode("postgres://db/app?sslrootcert=system"), DriverMode::Require);
    }
}
