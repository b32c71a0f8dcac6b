//! TLS to SMTP servers: which certificates are trusted and whether the name is checked.
//!
//! STARTTLS goes through lettre (`TlsParameters`); implicit TLS (`smtps://`) is our own
//! handshake (tokio-rustls on a `TcpStream` with `TCP_NODELAY`), handed to lettre as a
//! ready stream, because lettre's own implicit-TLS connect cannot set `TCP_NODELAY`
//! (~40 ms of Nagle delay per message). Both are built from the same `TlsOptions`: the
//! Mozilla roots lettre ships (`webpki-roots`), plus the CA certificates of
//! `tls_ca=FILE`, and the server's name checked unless `tls_verify_hostname=false`.

use std::sync::{Arc, OnceLock};

use lettre::transport::smtp::client::{Certificate, TlsParameters};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::MailError;

/// What a transport trusts. No `Default`: checking the name must be asked for off.
#[derive(Clone)]
pub struct TlsOptions {
    /// CA certificates (DER) trusted besides the built-in roots: a private CA, or a
    /// server's self-signed certificate made a CA.
    pub extra_roots: Vec<Vec<u8>>,
    /// `false` accepts a certificate issued for another name (still from a trusted CA,
    /// still valid). For a relay reached by an address or an alias its certificate does
    /// not name; it gives up protection against a man in the middle who holds any
    /// certificate from a trusted CA.
    pub verify_hostname: bool,
    /// The implicit-TLS client configuration, built at the first connection and shared
    /// by the transport's later ones (parsing the roots each time is wasted work).
    pub client_config: Arc<OnceLock<Result<Arc<ClientConfig>, String>>>,
}

impl TlsOptions {
    /// Reads the CA certificates of a PEM file.
    pub fn load_roots(path: &str) -> Result<Vec<Vec<u8>>, String> {
        let certs = crate::tls::load_pem_certificates(path).map_err(|e| format!("tls_ca {e}"))?;
        Ok(certs.into_iter().map(|c| c.to_vec()).collect())
    }

    /// lettre's parameters, for STARTTLS.
    pub fn lettre_parameters(&self, host: &str) -> Result<TlsParameters, MailError> {
        let mut builder = TlsParameters::builder(host.to_string());
        for der in &self.extra_roots {
            let cert = Certificate::from_der(der.clone())
                .map_err(|e| MailError::Config(format!("TLS CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        builder
            .dangerous_accept_invalid_hostnames(!self.verify_hostname)
            .build()
            .map_err(|e| MailError::Config(format!("TLS for {host}: {e}")))
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, MailError> {
        self.client_config
            .get_or_init(|| self.build_client_config().map(Arc::new))
            .clone()
            .map_err(MailError::Config)
    }

    /// `Err` is the message of a `MailError::Config`.
    fn build_client_config(&self) -> Result<ClientConfig, String> {
        let config_err = |e: rustls::Error| format!("TLS: {e}");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for der in &self.extra_roots {
            roots.add(CertificateDer::from(der.clone())).map_err(config_err)?;
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = if self.verify_hostname {
            builder.with_root_certificates(roots)
        } else {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(crate::tls::AnyName(inner)))
        };
        Ok(builder.with_no_client_auth())
    }

    /// The TLS handshake of implicit TLS on a connected socket.
    pub async fn connect(&self, host: &str, stream: TcpStream) -> Result<TlsStream<TcpStream>, MailError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| MailError::Config(format!("TLS server name {host:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(self.client_config()?);
        // Transient like every connection failure, a refused certificate included: a
        // provider's expired certificate is renewed, and retries with backoff bridge it.
        connector
            .connect(name, stream)
            .await
            .map_err(|e| MailError::Transient(format!("TLS handshake with {host}: {e}")))
    }
}

/// A TLS stream as lettre takes it.
#[derive(Debug)]
pub struct Stream(pub TlsStream<TcpStream>);

impl lettre::transport::smtp::client::AsyncTokioStream for Stream {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
