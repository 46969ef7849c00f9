//! The `tally` binary: parse the configuration, start logging, run until a signal.

use std::process::ExitCode;

use clap::Parser;
use tally::config::Config;
use tally::startup::App;
use tally::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    telemetry::init(config.log.format);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = ?e, "tally stopped with an error.");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    app.run_until(shutdown::signal()).await
}
