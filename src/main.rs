//! The `sluice` binary: parses arguments, calls the library, maps outcomes to exit codes
//! (0 success or nothing to do, 1 a file or step failed, 2 usage or config error).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use sluice::cli::{
    CatalogAction, Cli, Command, IndexAction, LogFormat, SchemaAction, WarehouseAction,
};
use sluice::config::{CatalogKind, Config};
use sluice::glue::Glue;
use sluice::lake::Lake;
use sluice::redact::{self, Masked};
use sluice::report::{RunReport, RunStatus};
use sluice::{Error, Result, demo, fault, infer, inspect, report, trigger, validate};

fn main() -> ExitCode {
    #[cfg(feature = "lambda")]
    if sluice::lambda::in_lambda() {
        return serve_lambda();
    }
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
            redact::eprint(&format!("sluice: {e}\n"));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

/// Runs as a Lambda custom runtime, logging JSON lines for CloudWatch.
#[cfg(feature = "lambda")]
fn serve_lambda() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Masked(std::io::stderr))
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
        .init();
    sluice::report::enable_metrics();
    let served = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the runtime", e))
        .and_then(|rt| rt.block_on(sluice::lambda::serve()));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            redact::eprint(&format!("sluice: {e}\n"));
            ExitCode::from(1)
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
    // Every line masked (secret values, passwords); colours only on a terminal, not with
    // NO_COLOR.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(redact::stderr_colour())
        .with_writer(Masked(std::io::stderr));
    match cli.log_format {
        // One object a line, with the fields of the enclosing spans (run id, source, table,
        // file, step) on every line.
        LogFormat::Json => {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .init();
            // CloudWatch Embedded Metric Format records after each run.
            sluice::report::enable_metrics();
        }
        LogFormat::Text => builder.init(),
    }
}

async fn load(cli: &Cli, config_path: &Path) -> Result<(Config, Lake)> {
    let mut config = Config::load(config_path)?;
    sluice::timeout::set(config.timeouts.get());
    config.resolve_secrets().await?;
    if let Some(limit) = &cli.memory_limit {
        sluice::config::parse_size(limit)
            .map_err(|e| Error::config(config_path, format!("--memory-limit: {e}")))?;
        config.engine.memory_limit = Some(limit.clone());
    }
    if let Some(limit) = &cli.max_runtime {
        sluice::config::parse_duration(limit)
            .map_err(|e| Error::config(config_path, format!("--max-runtime: {e}")))?;
        config.engine.max_runtime = Some(limit.clone());
    }
    if let Some(n) = cli.batch_files {
        if n == 0 {
            return Err(Error::config(config_path, "--batch-files: at least 1"));
        }
        config.engine.batch_files = Some(n);
    }
    if !cli.workers.is_empty() {
        config.engine.kind = sluice::config::EngineKind::Distributed;
        config.engine.workers = cli.workers.clone();
        config
            .engine
            .check_workers()
            .map_err(|e| Error::config(config_path, format!("--workers: {e}")))?;
    }
    let root = cli.lake.clone().unwrap_or_else(|| config.lake_root());
    let lake = Lake::open(&root, &config.timeouts.get())
        .await?
        .with_max_concurrent_requests(config.lake.max_concurrent_requests);
    Ok((config, lake))
}

async fn dispatch(cli: Cli) -> Result<u8> {
    match &cli.command {
        Command::Run { json, crash_at } => {
            if let Some(step) = crash_at {
                fault::arm(step);
            }
            let (config, lake) = load(&cli, &cli.config).await?;
            let report = trigger::run(&config, lake, None, !json).await?;
            if *json {
                redact::print(&format!("{}\n", to_json(&report)?));
            } else {
                redact::print(&report.summary());
            }
            Ok(exit_code(&report))
        }
        Command::Validate {
            sample,
            source,
            rows,
        } => {
            let config = Config::load(&cli.config)?;
            redact::print(&validate::validate(&config).await?);
            let Some(sample) = sample else {
                return Ok(0);
            };
            let source = infer::check::pick_source(&config, sample, source.as_deref())?;
            let report = infer::check::check(&config, source, sample, *rows)?;
            redact::print(&report.text);
            Ok(if report.ok { 0 } else { 1 })
        }
        Command::Schema {
            action: SchemaAction::Infer { file, rows, format },
        } => {
            let draft = infer::infer(file, format.map(Into::into), *rows)?;
            for n in &draft.notes {
                redact::eprint(&format!("note: {n}\n"));
            }
            redact::print(&draft.schema_toml());
            Ok(0)
        }
        Command::Init {
            dir,
            sample,
            name,
            format,
            rows,
        } => {
            let done =
                infer::project::init(dir, sample, name.as_deref(), format.map(Into::into), *rows)?;
            for n in &done.draft.notes {
                redact::eprint(&format!("note: {n}\n"));
            }
            redact::print(&format!(
                "project {} in {}: source and table {}, {} columns drafted from {} records, the \
                 sample in {}\nnext: sluice --config {} validate && sluice --config {} run\n",
                done.name,
                dir.display(),
                done.name,
                done.draft.columns.len(),
                done.draft.records,
                done.raw_file.display(),
                done.config.display(),
                done.config.display()
            ));
            Ok(0)
        }
        Command::Status { json } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let status = inspect::status(&config, &lake).await?;
            if *json {
                redact::print(&format!("{}\n", to_json(&status)?));
            } else {
                redact::print(&status.human());
            }
            Ok(0)
        }
        Command::Query { sql, format, as_of } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let out = inspect::query(&lake, sql, *format, &config.engine, *as_of).await?;
            redact::print(&format!("{out}\n"));
            Ok(0)
        }
        Command::IamPolicy {
            role,
            region,
            account,
            queue_arn,
        } => {
            let config = Config::load(&cli.config)?;
            let scope = sluice::iam::Scope {
                region: region.clone(),
                account: account.clone(),
                queue_arn: queue_arn.clone(),
            };
            let doc = sluice::iam::policy(&config, *role, &scope)?;
            redact::print(&format!("{}\n", to_json(&doc)?));
            Ok(0)
        }
        Command::Plan { json } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let run_id = sluice::report::new_run_id();
            let runner = sluice::pipeline::Runner::new(&config, lake, &run_id);
            let plan = runner.plan_next_run().await?;
            if *json {
                redact::print(&format!("{}\n", to_json(&plan)?));
            } else {
                redact::print(&plan.summary());
            }
            Ok(0)
        }
        Command::Report { html, runs } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let page = sluice::html::page(&config, &lake, *runs).await?;
            std::fs::write(html, page)
                .map_err(|e| Error::io(format!("cannot write {}", html.display()), e))?;
            redact::print(&format!("{}\n", html.display()));
            Ok(0)
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "sluice", &mut out);
            redact::print(&String::from_utf8_lossy(&out));
            Ok(0)
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(|e| Error::io("cannot render the man page", e))?;
            redact::print(&String::from_utf8_lossy(&out));
            Ok(0)
        }
        Command::Reprocess {
            table,
            since,
            until,
            files,
            dry_run,
            json,
            crash_at,
        } => {
            if let Some(step) = crash_at {
                fault::arm(step);
            }
            let (config, lake) = load(&cli, &cli.config).await?;
            let req = sluice::replay::ReplayRequest {
                table: table.clone(),
                since: *since,
                until: *until,
                files: files.clone(),
                dry_run: *dry_run,
            };
            let run_id = sluice::report::new_run_id();
            let shown = !*json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let runner = sluice::pipeline::Runner::new(&config, lake, &run_id)
                .with_progress(sluice::progress::Progress::new(shown));
            let report = runner.reprocess(&req).await;
            runner.progress_done();
            let report = report?;
            if *json {
                redact::print(&format!("{}\n", to_json(&report)?));
            } else {
                redact::print(&report.summary());
                for e in &report.errors {
                    redact::print(&format!("error: {e}\n"));
                }
            }
            Ok(if report.errors.is_empty() { 0 } else { 1 })
        }
        Command::Compact {
            table,
            target_size,
            crash_at,
        } => {
            if let Some(step) = crash_at {
                fault::arm(step);
            }
            let (config, lake) = load(&cli, &cli.config).await?;
            // The floor of `target_file_size`: smaller files would be compacted again at once.
            let size = target_size
                .as_deref()
                .map(|t| match sluice::config::parse_bytes(t) {
                    Ok(b) if b < 1 << 20 => Err(format!("\"{t}\" is too small: at least 1MiB")),
                    other => other,
                })
                .transpose()
                .map_err(|e| Error::config(&config.path, format!("--target-size: {e}")))?
                .map(|s| s as u64);
            let report = sluice::maintain::compact(&config, &lake, table.as_deref(), size).await?;
            redact::print(&report.summary());
            Ok(exit_code(&report))
        }
        Command::Check { table, json } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let (out, ok) =
                sluice::checks::check_command(&config, &lake, table.as_deref(), *json).await?;
            redact::print(&out);
            Ok(if ok { 0 } else { 1 })
        }
        Command::Index { action } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            match action {
                IndexAction::Rebuild { table } => {
                    let out =
                        sluice::index::rebuild_command(&config, &lake, table.as_deref()).await?;
                    redact::print(&out);
                    Ok(0)
                }
                IndexAction::Check { table, json } => {
                    let (out, ok) =
                        sluice::index::check_command(&config, &lake, table.as_deref(), *json)
                            .await?;
                    redact::print(&out);
                    Ok(if ok { 0 } else { 1 })
                }
            }
        }
        Command::Vacuum {
            table,
            retain,
            force,
            dry_run,
        } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let retain = sluice::config::parse_duration(retain)
                .map_err(|e| Error::config(&config.path, format!("--retain: {e}")))?;
            let report = sluice::maintain::vacuum(
                &config,
                &lake,
                table.as_deref(),
                retain,
                *force,
                *dry_run,
            )
            .await?;
            redact::print(&report.summary());
            Ok(exit_code(&report))
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
            redact::eprint(&format!("wrote {bytes} bytes\n"));
            Ok(0)
        }
        Command::HandleEvent { event, json } => {
            let text = if event == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| Error::io("cannot read the event from standard input", e))?
            } else {
                std::fs::read_to_string(event)
                    .map_err(|e| Error::io(format!("cannot read the event {event}"), e))?
            };
            let (config, lake) = load(&cli, &cli.config).await?;
            match trigger::handle_event(&config, lake, &text, !json).await? {
                None => {
                    redact::eprint("the event names no object of the lake; nothing to do\n");
                    Ok(0)
                }
                Some(report) => {
                    if *json {
                        redact::print(&format!("{}\n", to_json(&report)?));
                    } else {
                        redact::print(&report.summary());
                    }
                    Ok(exit_code(&report))
                }
            }
        }
        Command::Watch {
            queue,
            interval,
            schedule,
            every,
            visibility,
            wait,
        } => {
            let timed = match (schedule, every) {
                (Some(c), _) => Some(
                    sluice::schedule::Schedule::cron(c)
                        .map_err(|e| Error::config(&cli.config, format!("--schedule: {e}")))?,
                ),
                (None, Some(e)) => Some(
                    sluice::schedule::Schedule::every(e)
                        .map_err(|e| Error::config(&cli.config, format!("--every: {e}")))?,
                ),
                (None, None) => None,
            };
            let (config, lake) = load(&cli, &cli.config).await?;
            match (queue, timed) {
                (Some(q), _) => trigger::watch_queue(&config, lake, q, *visibility, *wait).await?,
                (None, Some(s)) => trigger::watch_schedule(&config, lake, &s).await?,
                (None, None) => {
                    trigger::watch_prefixes(&config, lake, Duration::from_secs(*interval)).await?
                }
            }
            Ok(0)
        }
        Command::Catalog {
            action: CatalogAction::Sync,
        } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let Some(db) = config
                .catalog
                .database
                .as_deref()
                .filter(|_| config.catalog.kind == CatalogKind::Glue)
            else {
                return Err(Error::config(
                    &config.path,
                    "catalog sync needs [catalog] kind = \"glue\" and a database",
                ));
            };
            let glue = Glue::new(db).await;
            for t in glue.sync(&lake).await? {
                let mut line = format!(
                    "{db}.{}: {} partitions in the lake, {} newly registered",
                    t.table, t.partitions, t.registered
                );
                if t.deregistered > 0 {
                    line.push_str(&format!(
                        ", {} deregistered (no files left)",
                        t.deregistered
                    ));
                }
                redact::print(&format!("{line}\n"));
            }
            Ok(0)
        }
        Command::Warehouse {
            action: WarehouseAction::Deploy,
        } => {
            let (config, _lake) = load(&cli, &cli.config).await?;
            for (file, statements) in sluice::warehouse::remote::deploy(&config).await? {
                redact::print(&format!("{file}: {statements} statements\n"));
            }
            Ok(0)
        }
        #[cfg(feature = "distributed")]
        Command::Worker { listen } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            sluice::distributed::serve(&config, &lake, *listen).await?;
            Ok(0)
        }
        Command::Enqueue {
            queue,
            source,
            json,
        } => {
            let (config, lake) = load(&cli, &cli.config).await?;
            let done = sluice::enqueue::enqueue(&config, &lake, queue, source.as_deref()).await?;
            if *json {
                redact::print(&format!("{}\n", to_json(&done)?));
            } else {
                for (source, keys) in &done.files {
                    redact::print(&format!("{source}: {} file(s)\n", keys.len()));
                }
                redact::print(&format!("{} message(s) sent to {queue}\n", done.messages));
            }
            Ok(0)
        }
        Command::Demo { dir } => {
            let dir = dir
                .clone()
                .unwrap_or_else(|| demo::default_dir(&report::new_run_id()));
            let config_path = demo::scaffold(&dir)?;
            redact::print(&format!("demo project in {}\n", dir.display()));
            let (config, lake) = load(&cli, &config_path).await?;
            let report = trigger::run(&config, lake.clone(), None, true).await?;
            redact::print(&report.summary());
            for agg in &config.aggregates {
                let sql = format!("SELECT * FROM {} ORDER BY 1, 2 LIMIT 6", agg.name);
                let out = inspect::query(
                    &lake,
                    &sql,
                    sluice::cli::OutputFormat::Table,
                    &config.engine,
                    None,
                )
                .await?;
                redact::print(&format!("\n{sql}\n{out}\n"));
            }
            redact::print(&format!(
                "\nexplore it: sluice --config {} query \"SELECT count(*) FROM app_logs\"\n",
                config_path.display()
            ));
            Ok(exit_code(&report))
        }
    }
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
