//! A fresh file system for a full run, so that every run starts from the
//! same disk state.
//!
//! On this machine's disk (ext4 without a journal) the inode allocator
//! passes over every inode freed in the last 60-360 s, on every allocation,
//! so the same build measured 0.5x to 0.9x rsync's time on the initial sync
//! depending on what had run in the minutes before (benchmarks.md,
//! "Method"). A full run therefore makes its own: a sparse image beside the
//! temporary directory, formatted as ext4 with a journal (what production
//! servers run; with a journal the allocator does not look at deletion
//! times), attached to a loop device with direct I/O (so that data written
//! to it goes to the disk once, and an fsync costs what it costs on the disk
//! itself, instead of going through a second page cache) and mounted. It is
//! unmounted, detached and removed when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image's size: scenario 3 keeps ten 256 MiB files, the others about
/// 700,000 small ones. Sparse, so only what is written takes space.
const SIZE: u64 = 16 << 30;

/// Bytes per inode: 2 million inodes in 16 GiB (the default, 16 KiB, gives
/// a million, too close to what a full run keeps).
const BYTES_PER_INODE: &str = "8192";

/// A mounted scratch file system.
pub struct ScratchFs {
    image: PathBuf,
    mount: PathBuf,
    device: String,
}

/// Runs `cmd`, and says what failed if it did.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl ScratchFs {
    /// Makes, attaches and mounts a fresh file system under `dir` (which must
    /// be on the disk to measure). Needs root and `losetup`/`mkfs.ext4`.
    pub fn create(dir: &Path) -> Result<ScratchFs, String> {
        let image = dir.join(format!("warmspare-bench-{}.img", std::process::id()));
        let mount = dir.join(format!("warmspare-bench-{}.mnt", std::process::id()));
        fs::File::create(&image)
            .and_then(|f| f.set_len(SIZE))
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        let made = (|| {
            // Lazy initialisation off: ext4 would otherwise zero inode tables
            // and the journal in the background, during the timed runs.
            run(Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-i",
                    BYTES_PER_INODE,
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                ])
                .arg(&image))?;
            run(Command::new("losetup")
                .args(["--find", "--show", "--direct-io=on"])
                .arg(&image))
        })();
        let device = match made {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_file(&image);
                return Err(e);
            }
        };
        let scratch = ScratchFs { image, mount, device };
        fs::create_dir_all(&scratch.mount).map_err(|e| format!("creating {}: {e}", scratch.mount.display()))?;
        run(Command::new("mount").arg(&scratch.device).arg(&scratch.mount))?;
        fs::create_dir_all(scratch.tmp()).map_err(|e| format!("creating {}: {e}", scratch.tmp().display()))?;
        Ok(scratch)
    }

    /// The directory to make the run's temporary files in.
    pub fn tmp(&self) -> PathBuf {
        self.mount.join("tmp")
    }

    /// What the table says about it.
    pub fn describe(&self) -> String {
        format!(
            "a fresh ext4 with a journal, made for this run on a {} GiB sparse image on the machine's disk, \
             attached with direct I/O ({})",
            SIZE >> 30,
            self.device
        )
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        // A lazy unmount as a last resort: a process the run left behind
        // must not keep the device attached for good.
        if run(Command::new("umount").arg(&self.mount)).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount));
        }
        let _ = run(Command::new("losetup").arg("-d").arg(&self.device));
        let _ = fs::remove_dir(&self.mount);
        let _ = fs::remove_file(&self.image);
    }
}
