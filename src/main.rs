//! The `sluice` binary: parses arguments, calls the library, maps outcomes to exit codes
//! (0 success or nothing to do, 1 a file or step failed, 2 usage or config error).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use sluice::cli::{Cli, Command, LogFormat};
use sluice::config::Config;
use sluice::lake::Lake;
use sluice::pipeline::{Progress, Runner};
use sluice::report::{RunReport, RunStatus};
use sluice::{Error, Result, demo, fault, inspect, notify, report, validate};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

fn init_logging(cli: &Cli) {
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn load(cli: &Cli, config_path: &Path) -> Result<(Config, Lake)> {
    let mut config = Config::load(config_path)?;
    if let Some(limit) = &cli.memory_limit {
        sluice::config::parse_size(limit)
            .map_err(|e| Error::config(config_path, format!("--memory-limit: {e}")))?;
        config.engine.memory_limit = Some(limit.clone());
    }
    let root = cli.lake.clone().unwrap_or_else(|| config.lake_root());
    let lake = Lake::open_local(&root)?;
    Ok((config, lake))
}

async fn dispatch(cli: Cli) -> Result<u8> {
    match &cli.command {
        Command::Run { json, crash_at } => {
            if let Some(step) = crash_at {
                fault::arm(step);
            }
            let (config, lake) = load(&cli, &cli.config)?;
            let report = run(&config, lake, !json).await?;
            if *json {
                println!("{}", to_json(&report)?);
            } else {
                print!("{}", report.summary());
            }
            Ok(exit_code(&report))
        }
        Command::Validate => {
            let config = Config::load(&cli.config)?;
            print!("{}", validate::validate(&config).await?);
            Ok(0)
        }
        Command::Status { json } => {
            let (config, lake) = load(&cli, &cli.config)?;
            let status = inspect::status(&config, &lake).await?;
            if *json {
                println!("{}", to_json(&status)?);
            } else {
                print!("{}", status.human());
            }
            Ok(0)
        }
        Command::Query { sql, format } => {
            let (config, lake) = load(&cli, &cli.config)?;
            println!(
                "{}",
                inspect::query(&lake, sql, *format, config.engine.threads()).await?
            );
            Ok(0)
        }
        Command::Generate {
            kind,
            out,
            rows,
            seed,
        } => {
            let rows = rows.unwrap_or_else(|| kind.default_rows());
            let (out, kind, seed) = (out.clone(), *kind, *seed);
            let threads = sluice::config::all_cores();
            let bytes = tokio::task::spawn_blocking(move || {
                sluice::generate::generate(kind, &out, rows, seed, threads)
            })
            .await
            .map_err(|e| Error::State {
                path: "generator".into(),
                message: e.to_string(),
            })??;
            eprintln!("wrote {bytes} bytes");
            Ok(0)
        }
        Command::Demo { dir } => {
            let dir = dir
                .clone()
                .unwrap_or_else(|| demo::default_dir(&report::new_run_id()));
            let config_path = demo::scaffold(&dir)?;
            println!("demo project in {}", dir.display());
            let (config, lake) = load(&cli, &config_path)?;
            let report = run(&config, lake.clone(), true).await?;
            print!("{}", report.summary());
            for agg in &config.aggregates {
                let sql = format!("SELECT * FROM {} ORDER BY 1, 2 LIMIT 6", agg.name);
                println!("\n{sql}");
                println!(
                    "{}",
                    inspect::query(
                        &lake,
                        &sql,
                        sluice::cli::OutputFormat::Table,
                        config.engine.threads()
                    )
                    .await?
                );
            }
            println!(
                "\nexplore it: sluice --config {} query \"SELECT count(*) FROM app_logs\"",
                config_path.display()
            );
            Ok(exit_code(&report))
        }
    }
}

async fn run(config: &Config, lake: Lake, human: bool) -> Result<RunReport> {
    let run_id = report::new_run_id();
    let runner = Runner::new(config, lake, &run_id);
    let progress = Progress::new(human && std::io::stderr().is_terminal());
    let result = runner.run(&progress).await;
    progress.finish();
    let mut report = result?;
    for e in notify::notify(&config.notify, &report).await {
        report.errors.push(e.to_string());
    }
    Ok(report)
}

fn exit_code(report: &RunReport) -> u8 {
    match report.status {
        RunStatus::Succeeded | RunStatus::NothingToDo => 0,
        RunStatus::Failed => 1,
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::State {
        path: "output".into(),
        message: e.to_string(),
    })
}
