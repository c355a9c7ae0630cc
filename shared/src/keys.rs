//! Node and operator keys: ed25519, OpenSSH formats, pinned in the cluster file.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

/// A key could not be made, read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not a key warmspare accepts.
    #[error("{0}")]
    Invalid(String),
}

/// A pinned public key (always ed25519).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(russh::keys::PublicKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_openssh())
    }
}

impl PublicKey {
    /// Parses an `ssh-ed25519 AAAA... [comment]` line.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let key = russh::keys::PublicKey::from_openssh(text.trim())
            .map_err(|e| KeyError::Invalid(format!("not an OpenSSH public key: {e}")))?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(KeyError::Invalid(format!(
                "only ssh-ed25519 keys are accepted, not {}",
                key.algorithm()
            )));
        }
        Ok(PublicKey::from_ssh(&key))
    }

    /// Wraps a key received over SSH (the comment is dropped).
    pub fn from_ssh(key: &russh::keys::PublicKey) -> PublicKey {
        let mut k = key.clone();
        k.set_comment("");
        PublicKey(k)
    }

    /// The `ssh-ed25519 AAAA...` line, without a comment.
    pub fn to_openssh(&self) -> String {
        self.0.to_openssh().unwrap_or_default().trim().to_string()
    }

    /// The underlying key.
    pub fn ssh(&self) -> &russh::keys::PublicKey {
        &self.0
    }

    /// Whether `other` (as received over SSH) is this key.
    pub fn matches(&self, other: &russh::keys::PublicKey) -> bool {
        self.0.key_data() == other.key_data()
    }
}

/// A node's or operator's private key.
#[derive(Clone)]
pub struct SecretKey(PrivateKey);

impl SecretKey {
    /// A fresh random ed25519 key.
    pub fn generate() -> SecretKey {
        let seed: [u8; 32] = rand::random();
        SecretKey(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
    }

    /// Reads an OpenSSH private key file (unencrypted ed25519). A file that
    /// group or others can read or write, or that another user owns, is
    /// refused, as `ssh` refuses one.
    pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut f = crate::perms::open_trusted(path, true).map_err(|e| match e {
            crate::perms::TrustError::Unsafe(why) => {
                KeyError::Invalid(format!("{}: the private key is refused: {why}", path.display()))
            }
            crate::perms::TrustError::Io(e) => io(e),
        })?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).map_err(io)?;
        let key = PrivateKey::from_openssh(text.as_bytes())
            .map_err(|e| KeyError::Invalid(format!("{}: not an OpenSSH private key: {e}", path.display())))?;
        if key.is_encrypted() {
            return Err(KeyError::Invalid(format!(
                "{}: encrypted keys are not supported",
                path.display()
            )));
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(KeyError::Invalid(format!(
                "{}: only ed25519 keys are supported",
                path.display()
            )));
        }
        Ok(SecretKey(key))
    }

    /// Writes the key in OpenSSH format with mode 0600; refuses to overwrite.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = self
            .0
            .to_openssh(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir).map_err(io)?;
            }
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey::from_ssh(self.0.public_key())
    }

    /// The key as russh wants it.
    pub fn ssh(&self) -> &PrivateKey {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_save_load_parse() {
        let d = tempfile::tempdir().unwrap();
        let k = SecretKey::generate();
        let p = d.path().join("sub/node.key");
        k.save(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(k.save(&p).is_err(), "overwrote a key");
        let back = SecretKey::load(&p).unwrap();
        let line = back.public().to_openssh();
        assert!(line.starts_with("ssh-ed25519 AAAA"));
        let parsed = PublicKey::parse(&format!("{line} admin@host")).unwrap();
        assert_eq!(parsed, k.public());
        assert!(parsed.matches(k.ssh().public_key()));
        assert!(PublicKey::parse("ssh-rsa AAAA").is_err());
        // A key group or others can read (or write) is refused, naming the file and mode.
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = SecretKey::load(&p).err().expect("an open key was accepted").to_string();
            assert!(e.contains(&format!("{mode:04o}")) && e.contains("node.key"), "{e}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(SecretKey::load(&p).is_ok());
    }
}
