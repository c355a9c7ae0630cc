//! Exit codes, as the design fixes them, and the error that carries one.

use std::process::ExitCode;

/// Done.
pub const OK: u8 = 0;
/// Failed.
pub const FAILED: u8 = 1;
/// Usage or configuration error.
pub const USAGE: u8 = 2;
/// Refused by a safety check.
pub const REFUSED: u8 = 3;
/// Outcome unknown (timed out in the middle of a change).
pub const UNKNOWN: u8 = 4;

/// An error with the exit code it means.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    /// What happened, for the operator.
    pub message: String,
}

/// An error that exits with `code`.
pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// Prints an error (if any) and maps the outcome to an exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(x) = e.downcast_ref::<Exit>() {
                ExitCode::from(x.code)
            } else if e.downcast_ref::<warmspare_shared::config::ConfigError>().is_some() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::from(FAILED)
            }
        }
    }
}
