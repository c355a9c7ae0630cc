//! Exit codes, as the design fixes them.

use std::process::ExitCode;

/// Done.
pub const OK: u8 = 0;
/// Failed.
pub const FAILED: u8 = 1;
/// Usage or configuration error.
pub const USAGE: u8 = 2;

/// Prints an error (if any) and maps the outcome to an exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<warmspare_shared::config::ConfigError>().is_some() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::from(FAILED)
            }
        }
    }
}
