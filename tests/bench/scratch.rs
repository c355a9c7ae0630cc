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

/// The image's size without scenario 5's trees: scenario 3 keeps ten
/// 256 MiB files, the others about 700,000 small ones. Sparse, so only what
/// is written takes space.
const BASE_SIZE: u64 = 16 << 30;

/// Inodes without scenario 5's trees: 2 million (the default ratio, 16 KiB
/// per inode, gives a million in 16 GiB, too close to what a full run keeps).
const BASE_INODES: u64 = 2_000_000;

/// What one more small file takes: a 4 KiB block, and its share of a
/// directory's blocks.
const PER_FILE: u64 = 5 << 10;

/// A mounted scratch file system.
pub struct ScratchFs {
    image: PathBuf,
    mount: PathBuf,
    device: String,
    /// The image's size in bytes.
    size: u64,
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
    /// be on the disk to measure), with room for `extra_files` small files
    /// beyond what the other scenarios keep. Needs root and
    /// `losetup`/`mkfs.ext4`.
    pub fn create(dir: &Path, extra_files: usize) -> Result<ScratchFs, String> {
        let extra = extra_files as u64;
        let size = BASE_SIZE + extra * PER_FILE;
        // Ten per cent more inodes than files, for the directories and the
        // agents' own files; never fewer than one per 8 KiB.
        let inodes = BASE_INODES + extra + extra / 10;
        let bytes_per_inode = (size / inodes).clamp(1024, 8192);
        let image = dir.join(format!("warmspare-bench-{}.img", std::process::id()));
        let mount = dir.join(format!("warmspare-bench-{}.mnt", std::process::id()));
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        let made = (|| {
            // Lazy initialisation off: ext4 would otherwise zero inode tables
            // and the journal in the background, during the timed runs.
            run(Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-i",
                    &bytes_per_inode.to_string(),
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
        let scratch = ScratchFs {
            image,
            mount,
            device,
            size,
        };
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
            self.size >> 30,
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
