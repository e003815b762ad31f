//! `herald`: the one binary (SPEC §11), a thin clap CLI over `herald-server` and
//! `herald-client`.
//!
//! # Layout
//! - this file: the command line, dispatch, and how failures become exit codes;
//! - [`serve`]: `serve` (config, logging, listener, signals, the server) and `check-config`;
//! - [`token`]: `token`, minting JWTs for tests and for `serve --dev`;
//! - [`remote`]: `publish` (server HTTP API) and `subscribe` (a terminal WebSocket client).
//!
//! Exit codes: 0 success; 1 runtime failure (bind, server, network, API error); 2 bad
//! configuration or usage; 130 a second SIGTERM/SIGINT while draining.

mod remote;
mod serve;
mod token;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_server::config::{ConfigError, ENV_PREFIX};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald, a real-time message gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Mint a JWT (for testing).
    Token(token::TokenArgs),
    /// Publish one message through the server API.
    Publish(remote::PublishArgs),
    /// Subscribe to topics and print each message as one JSON line.
    Subscribe(remote::SubscribeArgs),
    /// Check a configuration file (with the HERALD_* environment applied) and exit.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args).await,
        Command::Token(args) => token::token(args),
        Command::Publish(args) => remote::publish(args).await,
        Command::Subscribe(args) => remote::subscribe(args).await,
        Command::CheckConfig { file } => serve::check_config(&file),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the context chain on one line: "cannot listen on …: Address in use".
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The `HERALD_*` variables of this process, for `config::load`. Read with `vars_os` because
/// `std::env::vars` panics on a non-UTF-8 variable anywhere in the environment; a non-UTF-8
/// `HERALD_*` value is a configuration error, other variables are none of our business.
fn herald_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::Invalid {
            key: format!("environment {name}"),
            reason: "is not valid UTF-8".to_owned(),
        })?;
        vars.push((name.to_owned(), value));
    }
    Ok(vars)
}
