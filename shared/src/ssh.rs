//! SSH glue on `russh`: the agent's server side, the dialing side, pinned keys.
//!
//! Trust is exactly the keys of the cluster file. A server accepts public-key
//! authentication from a node or operator key and nothing else (no password,
//! no keyboard-interactive); a client accepts a server only if it presents the
//! key pinned for the node it dialed. Sessions carry one thing: the
//! [`SUBSYSTEM`](crate::proto::SUBSYSTEM) byte stream. Shells, exec and ptys
//! are refused.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use russh::keys::PrivateKeyWithHashAlg;
use russh::server::{Auth, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelStream, MethodKind, MethodSet, Preferred};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::keys::{PublicKey, SecretKey};
use crate::proto::SUBSYSTEM;

/// Who is on the other end of an authenticated session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A node of the cluster file.
    Node(String),
    /// An operator of the cluster file.
    Operator(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Node(n) => write!(f, "node {n}"),
            Identity::Operator(n) => write!(f, "operator {n}"),
        }
    }
}

/// The keys a server accepts, with whom each belongs to.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: Vec<(PublicKey, Identity)>,
}

impl Trust {
    /// Trusts `key` as `who`.
    pub fn add(&mut self, key: PublicKey, who: Identity) {
        self.keys.push((key, who));
    }

    /// The identity of `key`, if it is trusted.
    pub fn identify(&self, key: &russh::keys::PublicKey) -> Option<Identity> {
        self.keys
            .iter()
            .find(|(k, _)| k.matches(key))
            .map(|(_, who)| who.clone())
    }

    /// The identity of `key`, if it is trusted.
    pub fn identify_key(&self, key: &PublicKey) -> Option<Identity> {
        self.keys
            .iter()
            .find(|(k, _)| k.matches(key.ssh()))
            .map(|(_, who)| who.clone())
    }
}

/// SSH window and packet sizes shared by both sides (see docs/benchmarks.md).
const WINDOW: u32 = 16 * 1024 * 1024;
const PACKET: u32 = 32 * 1024;

fn preferred() -> Preferred {
    Preferred {
        cipher: Cow::Borrowed(&[russh::cipher::AES_256_GCM, russh::cipher::CHACHA20_POLY1305]),
        ..Preferred::default()
    }
}

/// The server configuration of an agent whose host key is `key`.
pub fn server_config(key: &SecretKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        keys: vec![key.ssh().clone()],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 3,
        inactivity_timeout: Some(Duration::from_secs(120)),
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        window_size: WINDOW,
        maximum_packet_size: PACKET,
        nodelay: true,
        preferred: preferred(),
        ..Default::default()
    })
}

/// The most connections a server keeps in their handshake (not yet
/// authenticated) at once; more are closed as soon as they are accepted.
pub const MAX_UNAUTHENTICATED: usize = 32;
/// How long a connection has to authenticate before it is closed.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(10);
/// The most sessions (channels) one connection may hold open at once.
pub const MAX_SESSIONS: usize = 8;

/// An authenticated session that asked for the warmspare subsystem.
pub struct IncomingSession {
    /// Who authenticated.
    pub identity: Identity,
    /// The key it authenticated with.
    pub key: PublicKey,
    /// The TCP peer address.
    pub peer: Option<SocketAddr>,
    /// The subsystem's byte stream.
    pub stream: ChannelStream<Msg>,
    /// This session's place among the [`MAX_SESSIONS`] of its connection,
    /// given back when the session (and so this) is dropped.
    pub slot: OwnedSemaphorePermit,
}

struct ServerHandler {
    trust: Arc<Trust>,
    identity: Option<(Identity, PublicKey)>,
    peer: Option<SocketAddr>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    sessions: mpsc::Sender<IncomingSession>,
    /// The connection's place among the unauthenticated ones, given back
    /// once it authenticates.
    preauth: Option<OwnedSemaphorePermit>,
    /// Set once it authenticated (ends the [`AUTH_DEADLINE`]).
    authed: Arc<AtomicBool>,
    /// The connection's sessions (see [`MAX_SESSIONS`]).
    slots: Arc<Semaphore>,
}

impl russh::server::Handler for ServerHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.trust.identify(offer.public_key).is_some() {
            Ok(Auth::Accept)
        } else {
            tracing::warn!(peer = ?self.peer, key = %PublicKey::from_ssh(offer.public_key).to_openssh(), "refused an SSH key that is not in the cluster file");
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(&mut self, _user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        match self.trust.identify(key.public_key) {
            Some(who) => {
                self.identity = Some((who, PublicKey::from_ssh(key.public_key)));
                self.authed.store(true, Ordering::SeqCst);
                self.preauth = None;
                Ok(Auth::Accept)
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Channels waiting for their subsystem and sessions being served
        // count alike: a channel forgotten once it got its subsystem let one
        // connection open 200 sessions.
        let serving = MAX_SESSIONS - self.slots.available_permits();
        if self.identity.is_some() && self.channels.len() + serving < MAX_SESSIONS {
            self.channels.insert(channel.id(), channel);
            reply.accept().await;
        } else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some((identity, key)), true) = (self.identity.clone(), name == SUBSYSTEM) else {
            tracing::warn!(peer = ?self.peer, subsystem = name, "refused an unknown subsystem");
            session.channel_failure(channel)?;
            return Ok(());
        };
        let Some(ch) = self.channels.remove(&channel) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = ?self.peer, who = %identity, "refused a session: the connection already has {MAX_SESSIONS}");
            session.channel_failure(channel)?;
            return Ok(());
        };
        session.channel_success(channel)?;
        let incoming = IncomingSession {
            identity,
            key,
            peer: self.peer,
            stream: ch.into_stream(),
            slot,
        };
        if self.sessions.send(incoming).await.is_err() {
            return Err(russh::Error::Disconnect);
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = ?self.peer, "refused an exec request: the endpoint has no shell");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        tracing::warn!(peer = ?self.peer, "refused a shell request: the endpoint has no shell");
        session.channel_failure(channel)?;
        Ok(())
    }
}

/// Runs the SSH protocol on one accepted TCP connection until it ends,
/// handing every subsystem session to `sessions`. `preauth` is the
/// connection's place among the unauthenticated ones (see
/// [`MAX_UNAUTHENTICATED`]): kept until it authenticates, which it must do
/// within [`AUTH_DEADLINE`].
pub async fn serve_connection(
    config: Arc<russh::server::Config>,
    tcp: TcpStream,
    trust: Arc<Trust>,
    sessions: mpsc::Sender<IncomingSession>,
    preauth: OwnedSemaphorePermit,
) -> Result<(), russh::Error> {
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let authed = Arc::new(AtomicBool::new(false));
    let stream = AuthDeadline {
        inner: tcp,
        authed: authed.clone(),
        timer: Box::pin(tokio::time::sleep(AUTH_DEADLINE)),
    };
    let handler = ServerHandler {
        trust,
        identity: None,
        peer,
        channels: HashMap::new(),
        sessions,
        preauth: Some(preauth),
        authed,
        slots: Arc::new(Semaphore::new(MAX_SESSIONS)),
    };
    let running = russh::server::run_stream(config, stream, handler).await?;
    running.await
}

/// A connection that fails every read and write once [`AUTH_DEADLINE`]
/// has passed without authentication: a client that connects and says
/// nothing, or stalls in the handshake, is closed then (russh's own
/// inactivity timeout is 120 s).
struct AuthDeadline<S> {
    inner: S,
    authed: Arc<AtomicBool>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> AuthDeadline<S> {
    /// The error to fail with once the deadline has passed unauthenticated
    /// (polling the timer registers the waker that ends a pending read).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        if self.authed.load(Ordering::SeqCst) {
            return None;
        }
        self.timer.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not authenticated within {} s", AUTH_DEADLINE.as_secs()),
            )
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why dialing a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No TCP connection could be made.
    #[error("unreachable: {0}")]
    Unreachable(std::io::Error),
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The peer's host key is not the one pinned in the cluster file.
    #[error("host key mismatch: the peer did not present the key pinned in the cluster file")]
    KeyMismatch,
    /// The peer refused our key.
    #[error("our key was refused")]
    AuthRefused,
    /// The peer refused the warmspare subsystem.
    #[error("the peer refused the warmspare subsystem")]
    SubsystemRefused,
    /// Any other SSH failure.
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
}

/// The dialing side's handler: accepts exactly the pinned host key.
pub struct PinnedHost {
    expected: PublicKey,
    mismatch: Arc<AtomicBool>,
}

impl russh::client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let ok = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => self.expected.matches(key),
            russh::keys::PublicKeyOrCertificate::Certificate(_) => false,
        };
        if !ok {
            self.mismatch.store(true, Ordering::SeqCst);
        }
        Ok(ok)
    }
}

/// An open client connection with its subsystem stream.
pub struct Dialed {
    /// Keeps the SSH connection alive; dropping it closes the connection.
    pub handle: russh::client::Handle<PinnedHost>,
    /// The subsystem's byte stream.
    pub stream: ChannelStream<russh::client::Msg>,
    /// The address the connection reached, when the socket tells it
    /// (`compress = "auto"` looks at whether it is a loopback one).
    pub peer: Option<std::net::SocketAddr>,
}

/// Dials `addr`, checks its host key against `server_key`, authenticates
/// with `key` as `user`, and opens the warmspare subsystem.
pub async fn dial(
    addr: &str,
    server_key: &PublicKey,
    key: &SecretKey,
    user: &str,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    tokio::time::timeout(timeout, dial_inner(addr, server_key, key, user))
        .await
        .map_err(|_| DialError::Timeout)?
}

async fn dial_inner(addr: &str, server_key: &PublicKey, key: &SecretKey, user: &str) -> Result<Dialed, DialError> {
    let tcp = TcpStream::connect(addr).await.map_err(DialError::Unreachable)?;
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let config = Arc::new(russh::client::Config {
        window_size: WINDOW,
        maximum_packet_size: PACKET,
        nodelay: true,
        inactivity_timeout: Some(Duration::from_secs(120)),
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        preferred: preferred(),
        ..Default::default()
    });
    let mismatch = Arc::new(AtomicBool::new(false));
    let handler = PinnedHost {
        expected: server_key.clone(),
        mismatch: mismatch.clone(),
    };
    let mut handle = match russh::client::connect_stream(config, tcp, handler).await {
        Ok(h) => h,
        Err(_) if mismatch.load(Ordering::SeqCst) => return Err(DialError::KeyMismatch),
        Err(e) => return Err(DialError::Ssh(e)),
    };
    let auth = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key.ssh().clone()), None))
        .await?;
    if !auth.success() {
        return Err(DialError::AuthRefused);
    }
    let mut channel = handle.channel_open_session().await?;
    channel.request_subsystem(true, SUBSYSTEM).await?;
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => break,
            Some(ChannelMsg::Failure) | None => return Err(DialError::SubsystemRefused),
            Some(_) => continue,
        }
    }
    Ok(Dialed {
        handle,
        stream: channel.into_stream(),
        peer,
    })
}
