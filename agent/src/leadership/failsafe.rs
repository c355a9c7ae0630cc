//! The active's failsafe probes (`[etcd] failsafe`): while this node holds
//! the leader key, one task per passive keeps a probe session (SSH,
//! `Purpose::Probe`, the same pinned keys as every link) and sends
//! `Request::Failsafe` every half `loop_wait`. A probe answered with a
//! promise is reported with the instant it was *sent*, for
//! `confirm::Leadership::record_probe`; a refusal, a late answer or a lost
//! session reports nothing (the session is dialed again).
//!
//! The rule is in `etcd::failsafe` (the passive's promise) and
//! `etcd::confirm` (the active's window); this module only carries probes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warmspare_shared::config::Node;
use warmspare_shared::proto::{FrameReader, FrameWriter, Purpose, Reply, Request};
use warmspare_shared::ssh;

use crate::live::Live;
use crate::role::Role;

/// The probes to the passives of one epoch; they stop when this is dropped.
pub(super) struct Prober {
    answered: mpsc::UnboundedReceiver<(String, Instant)>,
    stop: CancellationToken,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Prober {
    /// Starts probing every other node of the cluster for `epoch`, with
    /// `window` (the confirmation window) in each probe and a probe every
    /// `every`.
    pub(super) fn start(live: &Arc<Live>, role: &Arc<Role>, epoch: u64, window: Duration, every: Duration) -> Prober {
        let (tx, answered) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        for peer in live.cluster().node.iter().filter(|n| n.name != live.me.name) {
            let probe = Probe {
                live: live.clone(),
                role: role.clone(),
                peer: peer.clone(),
                epoch,
                window,
                every,
                tx: tx.clone(),
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = probe.run() => {}
                }
            });
        }
        Prober { answered, stop }
    }

    /// The probes answered with a promise since the last call: (passive,
    /// when the probe was sent).
    pub(super) fn answered(&mut self) -> Vec<(String, Instant)> {
        let mut out = Vec::new();
        while let Ok(a) = self.answered.try_recv() {
            out.push(a);
        }
        out
    }
}

/// The probes of one passive for one epoch.
struct Probe {
    live: Arc<Live>,
    role: Arc<Role>,
    peer: Node,
    epoch: u64,
    /// The confirmation window carried in each probe.
    window: Duration,
    /// How often a probe is sent (and how long an answer is awaited).
    every: Duration,
    /// Where a promise is reported, with the instant its probe was sent.
    tx: mpsc::UnboundedSender<(String, Instant)>,
}

impl Probe {
    /// Probes the peer until the channel closes, dialing again after each
    /// failure (at most every `every`).
    async fn run(&self) {
        let mut said = None;
        loop {
            let failed = match self.session().await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let why = format!("{failed:#}");
            if said.as_ref() != Some(&why) {
                tracing::warn!(peer = self.peer.name, epoch = self.epoch, "failsafe probe: {why}");
                said = Some(why);
            }
            if self.tx.is_closed() {
                return;
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// One probe session: dial, hello, then a probe every `every`, each
    /// answer awaited for at most `every`. Ends only with why it ended.
    async fn session(&self) -> anyhow::Result<std::convert::Infallible> {
        let (peer, epoch, every) = (&self.peer, self.epoch, self.every);
        let server_key = peer.key().context("the peer's public key")?;
        let limit = every.max(Duration::from_millis(500));
        let live = &self.live;
        let d = ssh::dial(&peer.ssh, &server_key, &live.key, &live.me.name, limit).await?;
        let (rd, wr) = tokio::io::split(d.stream);
        let (mut reader, mut writer) = (FrameReader::new(rd), FrameWriter::new(wr));
        let hello = tokio::time::timeout(limit, async {
            writer.send(&Request::Hello(self.role.hello(Purpose::Probe))).await?;
            match reader.recv::<Reply>().await? {
                Some(Reply::Hello(_)) => Ok::<_, anyhow::Error>(()),
                Some(other) => bail!("answered the hello with {other:?}"),
                None => bail!("closed the session"),
            }
        });
        hello.await.context("no hello in time")??;
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let mut refused: Option<String> = None;
        loop {
            let sent = Instant::now();
            let answer = tokio::time::timeout(limit, async {
                writer.send(&Request::Failsafe { epoch, window_ms }).await?;
                loop {
                    match reader.recv::<Reply>().await? {
                        Some(Reply::Promise { epoch: e, refused }) if e == epoch => return Ok(refused),
                        Some(_) => continue,
                        None => bail!("closed the session"),
                    }
                }
            })
            .await
            .context("no answer to the failsafe probe in time")??;
            match answer {
                None => {
                    if self.tx.send((peer.name.clone(), sent)).is_err() {
                        bail!("stopped");
                    }
                    refused = None;
                }
                Some(why) => {
                    if refused.as_ref() != Some(&why) {
                        tracing::warn!(peer = peer.name, epoch, "the passive gave no failsafe promise: {why}");
                        refused = Some(why);
                    }
                }
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(sent + every)).await;
        }
    }
}
