//! `ca-serial-guard`: advances a Puppet CA's `serial` file past anything the
//! previous active could have issued without the spare seeing it.
//!
//! Run from `on_promote` on the node taking over the CA. The next serial
//! becomes `max(serial file, highest serial in inventory.txt + 1, highest
//! serial of a certificate under signed/ (and ca_crt.pem) + 1) + margin`,
//! rounded up to a whole block, so that certificates the old active signed
//! after the last replication (at most `margin` of them) keep serials the new
//! active never reuses. Certificates are only read, never edited. The file is
//! replaced atomically with its owner and mode, in Puppet Server's format
//! (uppercase hex, zero-padded to four digits, no newline); Puppet Server
//! reads it as a signed 32-bit number, so a serial past 0x7FFFFFFF is refused.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// The highest serial Puppet Server can read from its `serial` file.
pub const MAX_SERIAL: u128 = 0x7FFF_FFFF;

/// The largest file read (certificates, inventory): a CA file is far smaller.
const MAX_FILE: u64 = 64 << 20;

/// What the guard found and decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The next serial the file held.
    pub current: u128,
    /// The highest serial listed in inventory.txt.
    pub inventory_max: Option<u128>,
    /// The highest serial of a certificate on disk.
    pub certs_max: Option<u128>,
    /// Certificates that could not be read as certificates (path, why).
    pub unreadable: Vec<(PathBuf, String)>,
    /// The next serial to write.
    pub next: u128,
}

/// Parses a serial file's text (hex, either case, surrounding space allowed).
pub fn parse_serial_file(text: &str) -> Option<u128> {
    let t = text.trim();
    if t.is_empty() || t.len() > 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(t, 16).ok()
}

/// Formats a serial the way Puppet Server writes it (`%04X`).
pub fn format_serial(serial: u128) -> String {
    format!("{serial:04X}")
}

/// The highest serial in an inventory.txt (`0x002F <not before> <not after> /CN=...`
/// lines); lines that do not start with a hex serial are skipped and counted.
pub fn inventory_max(text: &str) -> (Option<u128>, usize) {
    let mut max = None;
    let mut skipped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let first = line.split_whitespace().next().unwrap_or("");
        let hex = first.strip_prefix("0x").or_else(|| first.strip_prefix("0X"));
        match hex.and_then(parse_serial_file) {
            Some(s) => max = max.max(Some(s)),
            None => skipped += 1,
        }
    }
    (max, skipped)
}

/// The next serial: past everything seen plus `margin`, rounded up to `block`.
pub fn next_serial(current: u128, seen_max: Option<u128>, margin: u128, block: u128) -> Option<u128> {
    let floor = current.max(seen_max.map_or(0, |m| m.saturating_add(1)));
    let want = floor.checked_add(margin)?;
    let block = block.max(1);
    want.checked_add(block - 1).map(|w| w / block * block)
}

fn b64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        acc = (acc << 6) | u32::from(b64_value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The DER of the first certificate in PEM text.
pub fn first_pem_certificate(text: &str) -> Option<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN)? + BEGIN.len();
    let len = text[start..].find(END)?;
    base64_decode(&text[start..start + len])
}

/// One DER element: (tag, content, rest).
fn der_element(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, mut d) = d.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &d[..n] {
            len = (len << 8) | usize::from(b);
        }
        d = &d[n..];
        len
    };
    if d.len() < len {
        return None;
    }
    Some((tag, &d[..len], &d[len..]))
}

/// The serial number of a DER certificate (`Certificate.tbsCertificate.serialNumber`).
pub fn certificate_serial(der: &[u8]) -> Option<u128> {
    let (tag, cert, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_element(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (mut tag, mut serial, rest) = der_element(tbs)?;
    if tag == 0xA0 {
        // [0] EXPLICIT version
        (tag, serial, _) = der_element(rest)?;
    }
    if tag != 0x02 || serial.is_empty() || serial[0] & 0x80 != 0 {
        return None;
    }
    while serial.len() > 1 && serial[0] == 0 {
        serial = &serial[1..];
    }
    if serial.len() > 16 {
        return None;
    }
    Some(serial.iter().fold(0u128, |acc, &b| (acc << 8) | u128::from(b)))
}

/// Reads a regular file (never through a symbolic link), at most [`MAX_FILE`].
fn read_regular(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let before = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !before.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let f = fs::File::open(path)?;
    let after = f.metadata()?;
    // The same file that was checked, not one swapped in since.
    if (after.dev(), after.ino()) != (before.dev(), before.ino()) {
        return Err(io::Error::other("the file changed while it was opened"));
    }
    let mut out = Vec::new();
    f.take(MAX_FILE).read_to_end(&mut out)?;
    Ok(Some(out))
}

/// Looks at the CA directory and decides the next serial.
pub fn plan(ca_dir: &Path, margin: u128, block: u128) -> Result<Plan> {
    let serial_path = ca_dir.join("serial");
    let text = read_regular(&serial_path)
        .with_context(|| format!("cannot read {}", serial_path.display()))?
        .with_context(|| {
            format!(
                "{} does not exist: is this a Puppet CA directory?",
                serial_path.display()
            )
        })?;
    let current = parse_serial_file(&String::from_utf8_lossy(&text))
        .with_context(|| format!("{} does not hold a hexadecimal serial", serial_path.display()))?;
    let inv_path = ca_dir.join("inventory.txt");
    let inventory_max = match read_regular(&inv_path).with_context(|| format!("cannot read {}", inv_path.display()))? {
        Some(bytes) => {
            let (max, skipped) = self::inventory_max(&String::from_utf8_lossy(&bytes));
            if skipped > 0 {
                eprintln!("warning: {skipped} line(s) of {} have no serial", inv_path.display());
            }
            max
        }
        None => None,
    };
    let mut certs_max = None;
    let mut unreadable = Vec::new();
    let mut files = vec![ca_dir.join("ca_crt.pem")];
    let signed = ca_dir.join("signed");
    match fs::read_dir(&signed) {
        Ok(rd) => {
            for de in rd {
                let de = de.with_context(|| format!("cannot list {}", signed.display()))?;
                files.push(de.path());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", signed.display())),
    }
    for path in files {
        let is_pem = path.extension().is_some_and(|e| e == "pem");
        match read_regular(&path) {
            Ok(None) => {}
            Ok(Some(bytes)) => {
                match first_pem_certificate(&String::from_utf8_lossy(&bytes)).and_then(|d| certificate_serial(&d)) {
                    Some(s) => certs_max = certs_max.max(Some(s)),
                    None if is_pem => unreadable.push((path, "not a certificate with a readable serial".into())),
                    None => {}
                }
            }
            Err(e) => unreadable.push((path, e.to_string())),
        }
    }
    let seen = inventory_max.max(certs_max);
    let next = next_serial(current, seen, margin, block).context("the serial would overflow")?;
    Ok(Plan {
        current,
        inventory_max,
        certs_max,
        unreadable,
        next,
    })
}

/// Replaces `serial` in `ca_dir` with `next`, keeping its owner and mode.
pub fn write_serial(ca_dir: &Path, next: u128) -> Result<()> {
    if next > MAX_SERIAL {
        bail!(
            "the next serial {} is past 0x7FFFFFFF, the largest Puppet Server reads; refusing to write it",
            format_serial(next)
        );
    }
    let path = ca_dir.join("serial");
    let md = fs::symlink_metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
    if !md.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let tmp = ca_dir.join(format!(
        "{}serial.{}",
        warmspare_shared::relpath::TEMP_PREFIX,
        std::process::id()
    ));
    let result = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format_serial(next).as_bytes())?;
        let mine = f.metadata()?;
        if (mine.uid(), mine.gid()) != (md.uid(), md.gid()) {
            std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid()))?;
        }
        f.set_permissions(fs::Permissions::from_mode(md.permissions().mode() & 0o7777))?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(ca_dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot replace {}", path.display()))
}

/// Runs the guard: prints what it found and writes the new serial.
pub fn run(ca_dir: &Path, margin: u128, block: u128, dry_run: bool) -> Result<()> {
    let p = plan(ca_dir, margin, block)?;
    for (path, why) in &p.unreadable {
        eprintln!("warning: {}: {why}", path.display());
    }
    let show = |s: Option<u128>| s.map_or_else(|| "none".to_string(), |s| format!("0x{}", format_serial(s)));
    println!(
        "serial file: 0x{}; highest in inventory.txt: {}; highest certificate: {}",
        format_serial(p.current),
        show(p.inventory_max),
        show(p.certs_max)
    );
    if dry_run {
        println!("dry run: the next serial would be 0x{}", format_serial(p.next));
        return Ok(());
    }
    write_serial(ca_dir, p.next)?;
    println!(
        "next serial: 0x{} (was 0x{})",
        format_serial(p.next),
        format_serial(p.current)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A certificate made by `openssl req -x509 -set_serial 0x1F2E ...`
    // (the serial is the only field that matters here).
    fn der_with_serial(serial: &[u8], version: bool) -> Vec<u8> {
        let mut int = vec![0x02, serial.len() as u8];
        int.extend_from_slice(serial);
        let mut tbs_body = Vec::new();
        if version {
            tbs_body.extend_from_slice(&[0xA0, 0x03, 0x02, 0x01, 0x02]);
        }
        tbs_body.extend_from_slice(&int);
        tbs_body.extend_from_slice(&[0x30, 0x00]);
        let mut tbs = vec![0x30, tbs_body.len() as u8];
        tbs.extend_from_slice(&tbs_body);
        let mut cert = vec![0x30, 0x81, tbs.len() as u8];
        cert.extend_from_slice(&tbs);
        cert
    }

    #[test]
    fn serial_files_parse_in_both_cases_and_format_like_puppet_server() {
        assert_eq!(parse_serial_file("002F"), Some(0x2f));
        assert_eq!(parse_serial_file("2f\n"), Some(0x2f));
        assert_eq!(parse_serial_file(" 0A "), Some(10));
        assert_eq!(parse_serial_file(""), None);
        assert_eq!(parse_serial_file("0x10"), None);
        assert_eq!(parse_serial_file("12 34"), None);
        assert_eq!(format_serial(1), "0001");
        assert_eq!(format_serial(0x2f), "002F");
        assert_eq!(format_serial(0x12345), "12345");
    }

    #[test]
    fn inventory_max_reads_both_puppet_formats_and_skips_junk() {
        let text = "0x0001 2024-01-01T00:00:00UTC 2029-01-01T00:00:00UTC /CN=ca\n\
                    0x002f 2024-01-01T00:00:00UTC 2029-01-01T00:00:00UTC /CN=a\n\
                    0x001A 2024-01-01T00:00:00UTC 2029-01-01T00:00:00UTC /CN=b\n\
                    garbage\n\n";
        assert_eq!(inventory_max(text), (Some(0x2f), 1));
        assert_eq!(inventory_max(""), (None, 0));
    }

    #[test]
    fn next_serial_pads_past_everything_seen_to_a_block() {
        // serial file says 5, inventory saw up to 0x10: 0x11 + 0x1000, rounded up.
        assert_eq!(next_serial(5, Some(0x10), 0x1000, 0x1000), Some(0x2000));
        // The serial file can be the highest.
        assert_eq!(next_serial(0x3000, Some(0x10), 0x1000, 0x1000), Some(0x4000));
        assert_eq!(next_serial(0x2fff, None, 0x1000, 0x1000), Some(0x4000));
        // Without rounding: exactly past the highest plus the margin.
        assert_eq!(next_serial(2, Some(9), 100, 1), Some(110));
        // It always moves forward, even when run twice.
        let once = next_serial(2, Some(9), 0x1000, 0x1000).unwrap();
        assert!(next_serial(once, Some(9), 0x1000, 0x1000).unwrap() > once);
        assert_eq!(next_serial(u128::MAX - 1, None, 10, 1), None);
    }

    #[test]
    fn certificate_serials_are_read_from_der_with_and_without_a_version() {
        assert_eq!(certificate_serial(&der_with_serial(&[0x1f, 0x2e], true)), Some(0x1f2e));
        assert_eq!(certificate_serial(&der_with_serial(&[0x00, 0x80], false)), Some(0x80));
        assert_eq!(certificate_serial(&der_with_serial(&[0x80], true)), None, "negative");
        assert_eq!(certificate_serial(&[0x30, 0x05, 0x30]), None, "truncated");
        assert_eq!(certificate_serial(&[]), None);
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(first_pem_certificate(pem), Some(vec![0x30, 0x82, 0x01]));
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
    }

    #[test]
    fn the_guard_writes_the_padded_serial_and_keeps_the_mode() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("serial"), "0005").unwrap();
        fs::set_permissions(d.path().join("serial"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(
            d.path().join("inventory.txt"),
            "0x0003 2024-01-01T00:00:00UTC 2029-01-01T00:00:00UTC /CN=x\n",
        )
        .unwrap();
        fs::create_dir(d.path().join("signed")).unwrap();
        fs::write(d.path().join("signed/x.pem"), b"not a certificate").unwrap();
        let p = plan(d.path(), 0x1000, 0x1000).unwrap();
        assert_eq!((p.current, p.inventory_max, p.certs_max), (5, Some(3), None));
        assert_eq!(p.unreadable.len(), 1);
        run(d.path(), 0x1000, 0x1000, false).unwrap();
        assert_eq!(fs::read_to_string(d.path().join("serial")).unwrap(), "2000");
        let mode = fs::metadata(d.path().join("serial")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(fs::read(d.path().join("signed/x.pem")).unwrap(), b"not a certificate");
        // Past what Puppet Server reads: refused, the file untouched.
        fs::write(d.path().join("serial"), "7FFFF000").unwrap();
        assert!(run(d.path(), 0x1000, 0x1000, false).is_err());
        assert_eq!(fs::read_to_string(d.path().join("serial")).unwrap(), "7FFFF000");
        // A missing serial file is an error, never a fresh start.
        fs::remove_file(d.path().join("serial")).unwrap();
        assert!(plan(d.path(), 1, 1).is_err());
    }
}
