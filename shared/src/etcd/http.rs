//! One HTTP/1.1 exchange with one etcd member's JSON gateway: a connection
//! of its own per request, a `POST` of a JSON body, and the answer read
//! whole (bounded) or as a stream of JSON objects (a watch). An `https`
//! endpoint is dialed with TLS (see `tls`).

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::EtcdError;
use crate::config::Endpoint;

/// The most bytes of one answer (a range of two keys is a few hundred).
const MAX_ANSWER: usize = 1 << 20;
/// The most bytes one message of a watch stream may take.
const MAX_MESSAGE: usize = 1 << 20;

/// An answer being received, and the task that drives its connection
/// (stopped when this is dropped).
pub(super) struct Exchange {
    endpoint: String,
    body: Incoming,
    conn: JoinHandle<()>,
    /// Bytes of a stream not yet parsed.
    pending: BytesMut,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Sends `POST path` with `body` to `ep` and waits for the answer's head,
/// over TLS with `tls` when the endpoint is `https`. The caller bounds the
/// time (the whole exchange runs under its timeout).
pub(super) async fn post(
    ep: &Endpoint,
    tls: Option<&TlsConnector>,
    path: &str,
    body: &Value,
) -> Result<Exchange, EtcdError> {
    let endpoint = ep.to_string();
    let connect = |message: String| EtcdError::Connect {
        endpoint: endpoint.clone(),
        message,
    };
    let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| connect(e.to_string()))?;
    tcp.set_nodelay(true).map_err(|e| connect(e.to_string()))?;
    if !ep.tls {
        return exchange(ep, endpoint.clone(), tcp, path, body).await;
    }
    let Some(tls) = tls else {
        return Err(EtcdError::Tls(format!(
            "{endpoint}: an https endpoint needs etcd.ca in the cluster file"
        )));
    };
    let name = ServerName::try_from(ep.host.clone())
        .map_err(|e| EtcdError::Tls(format!("{endpoint}: {:?} is not a server name: {e}", ep.host)))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| connect(format!("TLS handshake: {}", chain(&e))))?;
    exchange(ep, endpoint.clone(), stream, path, body).await
}

/// The HTTP/1.1 exchange over an open connection `io` (plain or TLS).
async fn exchange<S>(ep: &Endpoint, endpoint: String, io: S, path: &str, body: &Value) -> Result<Exchange, EtcdError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let protocol = |message: String| EtcdError::Protocol {
        endpoint: endpoint.clone(),
        message,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| protocol(format!("HTTP handshake: {}", chain(&e))))?;
    let conn = tokio::spawn(async move {
        // The connection's own errors reach the exchange through the body.
        let _ = conn.await;
    });
    let bytes = serde_json::to_vec(body).map_err(|e| protocol(format!("encoding the request: {e}")))?;
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, ep.authority())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| protocol(format!("building the request: {e}")))?;
    let answer = sender.send_request(request).await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            conn.abort();
            return Err(protocol(format!("HTTP exchange: {}", chain(&e))));
        }
    };
    let status = answer.status();
    let mut exchange = Exchange {
        endpoint,
        body: answer.into_body(),
        conn,
        pending: BytesMut::new(),
    };
    if !status.is_success() {
        // The gateway's errors are JSON with the gRPC code and message.
        let text = exchange.whole().await;
        return Err(match text {
            Ok(v) => exchange.server_error(&v).unwrap_or_else(|| EtcdError::Protocol {
                endpoint: exchange.endpoint.clone(),
                message: format!("HTTP {status}: {v}"),
            }),
            Err(e) => e,
        });
    }
    Ok(exchange)
}

impl Exchange {
    /// The member this exchange is with.
    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The whole answer as one JSON value (at most [`MAX_ANSWER`] bytes).
    pub(super) async fn whole(&mut self) -> Result<Value, EtcdError> {
        let mut buf = BytesMut::new();
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|e| self.protocol(format!("reading the answer: {}", chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > MAX_ANSWER {
                    return Err(self.protocol(format!("the answer is larger than {MAX_ANSWER} bytes")));
                }
                buf.extend_from_slice(&data);
            }
        }
        serde_json::from_slice(&buf).map_err(|e| self.protocol(format!("the answer is not JSON: {e}")))
    }

    /// The next JSON object of a streamed answer (a watch), or an error
    /// when the stream ends or breaks.
    pub(super) async fn next_message(&mut self) -> Result<Value, EtcdError> {
        loop {
            if let Some(v) = self.parse_pending()? {
                return Ok(v);
            }
            let broken = |message: String| EtcdError::WatchBroken {
                endpoint: self.endpoint.clone(),
                message,
            };
            match self.body.frame().await {
                None => return Err(broken("the stream ended".into())),
                Some(Err(e)) => return Err(broken(chain(&e))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.pending.len() + data.len() > MAX_MESSAGE {
                            return Err(broken(format!("a message is larger than {MAX_MESSAGE} bytes")));
                        }
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// One complete JSON value from the front of the pending bytes, if any.
    fn parse_pending(&mut self) -> Result<Option<Value>, EtcdError> {
        let mut stream = serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
        match stream.next() {
            None => {
                self.pending.clear();
                Ok(None)
            }
            Some(Ok(v)) => {
                let used = stream.byte_offset();
                self.pending.advance(used);
                Ok(Some(v))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(EtcdError::WatchBroken {
                endpoint: self.endpoint.clone(),
                message: format!("a message is not JSON: {e}"),
            }),
        }
    }

    /// The gateway's error object (`{"error", "message", "code"}`) as an
    /// error, when `v` is one.
    pub(super) fn server_error(&self, v: &Value) -> Option<EtcdError> {
        let code = v.get("code")?.as_i64()?;
        let message = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Some(EtcdError::Server {
            endpoint: self.endpoint.clone(),
            code,
            message,
        })
    }

    fn protocol(&self, message: String) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoint.clone(),
            message,
        }
    }
}

/// `fut` within `limit`, or a timeout naming `ep`.
pub(super) async fn within<T>(
    ep: &Endpoint,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, EtcdError>>,
) -> Result<T, EtcdError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(EtcdError::Timeout {
            endpoint: ep.to_string(),
            after: limit,
        })
    })
}

/// `e` and each of its sources, joined by `: ` (hyper's own message alone
/// says only "connection error"; the TLS alert is in its source).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
