//! `herald serve` and `herald check-config`.

use std::io::{IsTerminal as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use herald_server::config::{
    self, Config, ConfigError, DevSecrets, LogConfig, LogFormat, Overrides,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::herald_env;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without one, the defaults apply (and [auth] must come from
    /// the environment, e.g. HERALD_AUTH__JWT_SECRET).
    #[arg(
        long,
        short,
        env = "HERALD_CONFIG",
        value_name = "FILE",
        conflicts_with = "dev"
    )]
    config: Option<PathBuf>,
    /// Development mode: embedded defaults, a random secret and admin key, and a ready token
    /// printed at startup. Environment variables and flags still apply.
    #[arg(long)]
    dev: bool,
    /// Address to listen on (overrides server.listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// This node's id (overrides server.node_id).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Store URL (overrides store.url).
    #[arg(long, value_name = "URL")]
    store_url: Option<String>,
    /// Bus URL (overrides bus.url).
    #[arg(long, value_name = "URL")]
    bus_url: Option<String>,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: args.listen,
        node_id: args.node_id,
        store_url: args.store_url,
        bus_url: args.bus_url,
    };
    let env = herald_env()?;
    let (config, dev) = if args.dev {
        let (config, secrets) = config::load_dev(env, &overrides)?;
        (config, Some(secrets))
    } else {
        (config::load(args.config.as_deref(), env, &overrides)?, None)
    };
    init_tracing(&config.log)?;

    // Signals are hooked before the address is printed: whoever reads that line may send
    // SIGTERM at once, and it must drain, not kill.
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone()).context("cannot install signal handlers")?;

    // Connect the backends before anything listens: a bad store URL fails here, before the
    // `listening on` line.
    let listen = config.server.listen;
    let log_fields = (
        config.server.node_id.clone(),
        herald_core::redact::url_password(&config.store.url),
        herald_core::redact::url_password(&config.bus.url),
    );
    let node = herald_server::Node::start(config.clone(), shutdown.clone())
        .await
        .context("cannot start")?;

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")
            .and_then(|()| match &dev {
                Some(secrets) => print_dev_banner(&mut out, addr, &config, secrets),
                None => Ok(()),
            })
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
    }
    let (node_id, store, bus) = log_fields;
    tracing::info!(%addr, %node_id, %store, %bus, dev = dev.is_some(), "herald listening");

    node.serve(listener).await.context("server failed")?;
    tracing::info!("drained, exiting");
    Ok(ExitCode::SUCCESS)
}

pub fn check_config(file: &Path) -> anyhow::Result<ExitCode> {
    let config = config::load(Some(file), herald_env()?, &Overrides::default())?;
    log_filter("log.level", &config.log.level)?;
    println!("ok: {}", file.display());
    Ok(ExitCode::SUCCESS)
}

/// `log.level`, unless `RUST_LOG` (or `HERALD_LOG`) is set: then that wins. Logs go to stderr,
/// as text or JSON lines.
fn init_tracing(log: &LogConfig) -> anyhow::Result<()> {
    let from_env = ["RUST_LOG", "HERALD_LOG"].into_iter().find_map(|var| {
        Some((
            var,
            std::env::var(var).ok().filter(|v| !v.trim().is_empty())?,
        ))
    });
    let filter = match from_env {
        Some((var, directives)) => log_filter(var, &directives)?,
        None => log_filter("log.level", &log.level)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // Its default reports a failed write with `eprintln!`, which panics when stderr is a
        // closed pipe and would take the server down with it.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}

fn log_filter(source: &str, directives: &str) -> Result<EnvFilter, ConfigError> {
    EnvFilter::try_new(directives).map_err(|e| ConfigError::Invalid {
        key: source.to_owned(),
        reason: format!("{directives:?} is not a valid log filter: {e}"),
    })
}

/// First SIGTERM or SIGINT: cancel `shutdown`, so the server drains. Second: exit 130 now.
fn watch_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(
                signal = name,
                "draining connections; send the signal again to exit at once"
            );
            shutdown.cancel();
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = writeln!(std::io::stderr(), "second signal: exiting without draining");
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shutdown.cancel();
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    }
    Ok(())
}

/// What `--dev` prints after the address: a token, the admin key, and what to do with them.
fn print_dev_banner(
    out: &mut impl std::io::Write,
    addr: SocketAddr,
    config: &Config,
    secrets: &DevSecrets,
) -> std::io::Result<()> {
    // A wildcard address is not something to paste into a browser.
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        ip if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    };
    let token = crate::token::mint_dev_token(
        secrets.jwt_secret.expose(),
        &config.auth,
        "demo",
        Duration::from_secs(24 * 3600),
        &["admin".to_owned()],
    );
    writeln!(out)?;
    writeln!(
        out,
        "  Herald dev mode: SQLite store in data/herald.db, in-memory bus, random secrets (tokens stop working on restart)."
    )?;
    writeln!(out)?;
    match &token {
        Ok(token) => {
            writeln!(out, "  demo page    http://{host}/demo?token={token}")?;
            writeln!(out, "  user token   {token}")?;
            writeln!(
                out,
                "               (user \"demo\", roles [\"admin\"], HS256, valid 24h)"
            )?;
        }
        Err(e) => writeln!(out, "  user token   unavailable: {e:#}")?,
    }
    let key = secrets.admin_key.as_ref().map(|k| k.expose());
    match key {
        Some(key) => writeln!(out, "  admin key    {key}   (scopes publish, admin)")?,
        None => writeln!(out, "  admin key    (from HERALD_AUTH__API_KEYS)")?,
    }
    writeln!(out)?;
    writeln!(out, "  publish to the demo user:")?;
    writeln!(
        out,
        "    curl -sS -X POST http://{host}/api/v1/publish \\\n      \
         -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \\\n      \
         -d '{{\"topic\":\"user/demo\",\"event\":\"notification\",\"data\":{{\"title\":\"hello\"}}}}'",
        key.unwrap_or("ADMIN_KEY")
    )?;
    writeln!(out)?;
    writeln!(out, "  subscribe from a terminal:")?;
    writeln!(
        out,
        "    herald subscribe --url ws://{host}/ws --token {} user/demo room/lobby",
        token.as_deref().unwrap_or("TOKEN")
    )?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            herald_core::redact::url_password("postgres://u:pw@db:5432/herald?x=1"),
            "postgres://u:***@db:5432/herald?x=1"
        );
        assert_eq!(
            herald_core::redact::url_password("mysql://root@127.0.0.1/test"),
            "mysql://root@127.0.0.1/test"
        );
        assert_eq!(
            herald_core::redact::url_password("redis://:secret@h:6379"),
            "redis://:***@h:6379"
        );
        assert_eq!(
            herald_core::redact::url_password("sqlite://data/herald.db"),
            "sqlite://data/herald.db"
        );
        assert_eq!(herald_core::redact::url_password("memory"), "memory");
    }
}
