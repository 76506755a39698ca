//! The `homing` binary: parses the command line, sets up logging, runs the command
//! and turns errors into messages and exit codes. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = homing::cli::Cli::parse();
    homing::logging::init(cli.verbose);
    match homing::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line per cause, outermost first: what failed, then why.
            eprintln!("homing: error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
