//! The benchmark's TLS: a test CA made at the start of every run, the certificate it signs for
//! the benchmark host (served by nginx and by the event-stream server), and the client side that
//! opens HTTPS connections straight to an upstream or through a proxy's tunnel.
//!
//! The client is rustls (with ring), the stack paude-proxy's own tests use, running inside the
//! load generator: every round is an exact time slice, its CPU time is metered with the rest of
//! the load side, and eight parallel streams are eight tasks rather than eight processes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::client::{self, Route, HOST};

/// A CA made for this run and what it signed.
pub struct BenchTls {
    /// Trusts the run's CA only, for connections to `bench.test`.
    pub client: Arc<rustls::ClientConfig>,
    /// Serves the certificate for `bench.test` (the event-stream server).
    pub server: Arc<rustls::ServerConfig>,
    /// The certificate for `bench.test` and the CA's, in PEM, for nginx.
    pub chain_pem: String,
    /// The certificate's private key in PEM, for nginx.
    pub key_pem: String,
}

impl BenchTls {
    /// Makes a CA and a certificate for [`HOST`] signed by it.
    pub fn new() -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "paude-benches test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf =
            rcgen::CertificateParams::new(vec![HOST.to_owned()])?.signed_by(&leaf_key, &ca)?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone())?;
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca.der().clone()];
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(BenchTls {
            client: Arc::new(client),
            server: Arc::new(server),
            chain_pem: format!("{}{}", leaf.pem(), ca.pem()),
            key_pem: leaf_key.serialize_pem(),
        })
    }

    /// Opens a TLS connection to `upstream` (through the proxy's tunnel when `route` has one)
    /// with `bench.test` as the server name, and completes the handshake.
    pub async fn connect(
        &self,
        route: Route,
        upstream: SocketAddr,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let stream = client::open_raw_tunnel(route, upstream).await?;
        let name = ServerName::try_from(HOST).context("the benchmark host is no server name")?;
        tokio_rustls::TlsConnector::from(self.client.clone())
            .connect(name, stream)
            .await
            .context("TLS handshake with the upstream failed")
    }
}
