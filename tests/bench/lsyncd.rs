//! lsyncd as an anchor: `default.rsync` with `delay = 0` (rsync over the
//! bench's sshd), as a user would run it to keep a second server close.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warmspare_tests::write_file;

use super::Sshd;

/// A running lsyncd, killed when dropped.
pub struct Lsyncd {
    child: Child,
}

impl Drop for Lsyncd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lsyncd {
    /// Starts lsyncd mirroring `src` into `target` (created; `name` names
    /// its config and log files under `work`) and returns once its startup
    /// sync is done (a marker file `lsyncd-ready` arrived); `None` when
    /// lsyncd is not installed or did not come up within two minutes.
    pub fn start(sshd: &Sshd, work: &Path, name: &str, src: &Path, target: &Path) -> Option<Lsyncd> {
        let lsyncd = ["/usr/bin/lsyncd", "/usr/local/bin/lsyncd"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        fs::create_dir_all(target).unwrap();
        sshd.rsync(src, target, &[]);
        let cfg = work.join(format!("{name}.conf"));
        fs::write(
            &cfg,
            format!(
                "settings {{ nodaemon = true, logfile = \"{}\" }}\nsync {{ default.rsync, source = \"{}\", target = \"127.0.0.1:{}\", delay = 0,\n  rsync = {{ archive = true, rsh = \"{}\" }} }}\n",
                work.join(format!("{name}.log")).display(),
                src.display(),
                target.display(),
                sshd.ssh_args()
            ),
        )
        .unwrap();
        let child = Command::new(lsyncd)
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let me = Lsyncd { child };
        // lsyncd starts with a full sync; a marker arriving says it is done.
        write_file(&src.join("lsyncd-ready"), b"ready", 0o644);
        let ready = Instant::now() + Duration::from_secs(120);
        while !target.join("lsyncd-ready").exists() {
            if Instant::now() > ready {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(me)
    }
}
