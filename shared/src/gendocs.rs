//! Man pages and shell completions from a binary's clap definitions.

use std::fs;
use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// Writes `NAME.1` and bash, zsh and fish completions for `C` into `out`.
pub fn generate<C: CommandFactory>(name: &'static str, out: &Path) -> io::Result<()> {
    fs::create_dir_all(out)?;
    let cmd = C::command().name(name);
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    fs::write(out.join(format!("{name}.1")), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, name, out)?;
    }
    Ok(())
}
