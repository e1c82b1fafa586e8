//! Connecting to the daemon and running calls.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, error_chain, transport_detail};
use crate::events::{Event, Verdict};
use crate::pb::{
    self, generate_client_message, generate_server_message, guard_client::GuardClient,
};
use crate::request::Request;

/// Where the daemon listens: `unix:/abs/path` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket.
    Unix(String),
    /// TCP; `host` is a name or an IP address, IPv6 without brackets.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::new(
                Code::InvalidArgument,
                format!("addr: {s:?} is not unix:PATH or HOST:PORT"),
            )
        };
        // unix:///abs/path (gRPC's URI form) or unix:path.
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            return if path.is_empty() {
                Err(bad())
            } else {
                Ok(Address::Unix(path.to_string()))
            };
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()), // IPv6 needs brackets
            None => host,
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad());
        }
        Ok(Address::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{path}"),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How to connect: TLS (with a client certificate for mutual TLS) and a bearer
/// token, all optional.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    tls_ca_pem: Option<Vec<u8>>,
    tls_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    token: Option<String>,
    connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            tls_ca_pem: None,
            tls_identity_pem: None,
            token: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnectOptions {
    /// Plain connection, no token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use TLS (TCP addresses only), checking the server's certificate against
    /// this PEM CA for the host name (or IP address) of the address.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Present this PEM client certificate (chain) and its PEM private key to the
    /// server: mutual TLS, for a daemon with `tls.client_ca`. Needs
    /// [`tls_ca_pem`](Self::tls_ca_pem) too (this crate carries no system roots).
    pub fn tls_identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.tls_identity_pem = Some((cert.into(), key.into()));
        self
    }

    /// Send `authorization: Bearer TOKEN` with every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Give up connecting after this long (10 s by default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// A connection to the daemon. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    stub: GuardClient<Channel>,
    addr: String,
    authorization: Option<AsciiMetadataValue>,
}

impl Client {
    /// Connects at once (fail fast): an unreachable daemon is an `UNAVAILABLE`
    /// error here, not on the first call.
    pub async fn connect(addr: &str, options: ConnectOptions) -> Result<Self, Error> {
        let address: Address = addr.parse()?;
        let authorization = options
            .token
            .as_deref()
            .map(|token| {
                AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    Error::new(Code::InvalidArgument, "token: not valid in an HTTP header")
                })
            })
            .transpose()?;
        let endpoint = endpoint(&address, options.tls_ca_pem, options.tls_identity_pem)?
            .connect_timeout(options.connect_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| Error::unreachable(addr, &transport_detail(&err, &err.to_string())))?;
        Ok(Self {
            stub: GuardClient::new(channel),
            addr: addr.to_string(),
            authorization,
        })
    }

    /// The served model, the policies a request may name, and the limits.
    pub async fn info(&self) -> Result<pb::Info, Error> {
        let request = self.request(pb::GetInfoRequest {});
        let response = self.stub.clone().get_info(request).await;
        response
            .map(tonic::Response::into_inner)
            .map_err(|s| Error::from_status(&self.addr, s))
    }

    /// Starts a generation. Resolves once the daemon has accepted the call; a
    /// request it refuses (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, ...) is an
    /// error here or as the stream's first item.
    pub async fn generate(&self, request: Request) -> Result<Generation, Error> {
        // Room for the start message and one cancel: neither send ever waits.
        let (sender, receiver) = mpsc::channel(2);
        let start = generate_client_message::Kind::Start(request.into_proto());
        sender
            .try_send(pb::GenerateClientMessage { kind: Some(start) })
            .expect("a new channel has room");
        let outgoing = self.request(ReceiverStream::new(receiver));
        let response = self.stub.clone().generate(outgoing).await;
        let responses = response
            .map_err(|s| Error::from_status(&self.addr, s))?
            .into_inner();
        Ok(Generation {
            responses,
            canceller: Canceller {
                sender,
                sent: Arc::new(AtomicBool::new(false)),
            },
            addr: self.addr.clone(),
            done: false,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            let metadata: &mut MetadataMap = request.metadata_mut();
            metadata.insert("authorization", value.clone());
        }
        request
    }
}

/// The tonic endpoint for an address: native unix sockets (tonic's `unix:`
/// URIs), plain HTTP/2 or TLS over TCP, with a client identity for mutual TLS.
fn endpoint(
    address: &Address,
    tls_ca_pem: Option<Vec<u8>>,
    tls_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<Endpoint, Error> {
    let invalid = |err: tonic::transport::Error| {
        Error::new(Code::InvalidArgument, error_chain(&err, &err.to_string()))
    };
    if tls_identity_pem.is_some() && tls_ca_pem.is_none() {
        return Err(Error::new(
            Code::InvalidArgument,
            "tls: a client certificate needs the server's CA (tls_ca_pem)",
        ));
    }
    match (address, tls_ca_pem) {
        (Address::Unix(_), Some(_)) => Err(Error::new(
            Code::InvalidArgument,
            "tls: TLS needs a HOST:PORT address, not a unix socket",
        )),
        (Address::Unix(_), None) => Endpoint::from_shared(address.to_string()).map_err(invalid),
        (Address::Tcp { .. }, None) => {
            Endpoint::from_shared(format!("http://{address}")).map_err(invalid)
        }
        (Address::Tcp { host, .. }, Some(pem)) => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(host.clone());
            if let Some((cert, key)) = tls_identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            Endpoint::from_shared(format!("https://{address}"))
                .and_then(|e| e.tls_config(tls))
                .map_err(invalid)
        }
    }
}

/// A running generation: a [`Stream`] of [`Event`]s ending with the verdict.
///
/// Dropping it cancels the call outright; [`Generation::cancel`] asks the daemon
/// to stop within one decode step and still delivers the `Cancelled` verdict.
#[derive(Debug)]
pub struct Generation {
    responses: tonic::Streaming<pb::GenerateServerMessage>,
    canceller: Canceller,
    addr: String,
    done: bool,
}

impl Generation {
    /// Sends `Cancel` (once; later calls do nothing). Keep reading for the verdict.
    pub fn cancel(&self) {
        self.canceller.cancel();
    }

    /// A handle that cancels this generation from elsewhere (another task, a
    /// signal handler).
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// Reads the rest of the stream and returns the verdict.
    pub async fn verdict(mut self) -> Result<Verdict, Error> {
        use tokio_stream::StreamExt;
        while let Some(event) = self.next().await {
            if let Event::Verdict(verdict) = event? {
                return Ok(verdict);
            }
        }
        unreachable!("a Generation ends with a verdict or an error")
    }
}

impl Stream for Generation {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use generate_server_message::Kind;
        while !self.done {
            let item = ready!(Pin::new(&mut self.responses).poll_next(cx));
            let event = match item {
                Some(Ok(pb::GenerateServerMessage { kind: Some(kind) })) => match kind {
                    Kind::Started(started) => Event::Started(started),
                    Kind::Token(token) => Event::Token(token.into()),
                    Kind::Verdict(verdict) => {
                        self.done = true;
                        Event::Verdict(verdict.into())
                    }
                },
                // A message kind newer than this client: nothing to report.
                Some(Ok(pb::GenerateServerMessage { kind: None })) => continue,
                Some(Err(status)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::from_status(&self.addr, status))));
                }
                None => {
                    self.done = true;
                    let message = format!(
                        "the daemon at {} ended the stream without a verdict",
                        self.addr
                    );
                    return Poll::Ready(Some(Err(Error::new(Code::Unknown, message))));
                }
            };
            return Poll::Ready(Some(Ok(event)));
        }
        Poll::Ready(None)
    }
}

/// Cancels one generation; cloneable, usable from any task.
#[derive(Debug, Clone)]
pub struct Canceller {
    sender: mpsc::Sender<pb::GenerateClientMessage>,
    sent: Arc<AtomicBool>,
}

impl Canceller {
    /// Sends `Cancel` unless it was sent already. Never blocks.
    pub fn cancel(&self) {
        if !self.sent.swap(true, Ordering::SeqCst) {
            let cancel = generate_client_message::Kind::Cancel(pb::Cancel {});
            // Fails only when the call is over, and then there is nothing to cancel.
            let _ = self
                .sender
                .try_send(pb::GenerateClientMessage { kind: Some(cancel) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/tmp/fse.sock".parse(),
            Ok(Address::Unix("/tmp/fse.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:47001".parse(),
            Ok(Address::Tcp {
                host: "127.0.0.1".into(),
                port: 47001
            })
        );
        assert_eq!(
            "[::1]:5".parse(),
            Ok(Address::Tcp {
                host: "::1".into(),
                port: 5
            })
        );
        assert_eq!("[::1]:5".parse::<Address>().unwrap().to_string(), "[::1]:5");
        for bad in [
            "",
            "unix:",
            "localhost",
            "host:port",
            ":80",
            "::1:80",
            "a:99999",
            "http://x:1",
        ] {
            let err = bad.parse::<Address>().unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn tls_is_refused_for_unix_sockets() {
        let err = endpoint(&Address::Unix("/x".into()), Some(b"pem".to_vec()), None).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[test]
    fn a_client_certificate_needs_the_servers_ca() {
        let tcp = "127.0.0.1:1".parse::<Address>().unwrap();
        let identity = Some((b"cert".to_vec(), b"key".to_vec()));
        let err = endpoint(&tcp, None, identity).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("tls_ca_pem"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_daemon_fails_fast() {
        let addr = "unix:/nonexistent/fse-test.sock";
        let err = Client::connect(addr, ConnectOptions::new())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(
            err.message()
                .starts_with("cannot reach the daemon at unix:/nonexistent/fse-test.sock ("),
            "{err}"
        );
    }
}
