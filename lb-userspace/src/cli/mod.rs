//! The admin CLI: `lb service`, `lb backend`, `lb stats`, `lb status`,
//! `lb events`, `lb completions`. A thin client of the admin API ([`crate::api`]): each
//! command is one request (`stats --watch` one per interval), `--json`
//! prints the API's body as it came, pretty-printed, and a refusal prints
//! the daemon's one line as `error: …` and exits 1. Usage errors are clap's
//! and exit 2.

pub mod args;
pub mod format;
pub mod rates;

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use clap::CommandFactory as _;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use self::args::{Admin, Cli, Command};
use self::{
    args::{BackendCommand, EventsArgs, ServiceCommand, StatsArgs},
    rates::Rates,
};
use crate::api::{
    client::Client,
    types::{BackendInfo, Event, ServiceInfo, Stats, Status, Weight},
};

/// Runs an admin command against the daemon on `socket` and prints its
/// result; errors are printed as one line. Exit code 0 or 1.
pub fn run(command: Admin, socket: &Path) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(execute(command, socket)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`lb stats --watch | head`): nothing to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// Writes `text` to stdout as it is, flushed.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lb", &mut script);
    print(&String::from_utf8_lossy(&script))
}

/// One path segment of an API URL: everything but unreserved characters
/// and `:` percent-encoded, so any name reaches the daemon intact.
pub fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `GET /v1/stats` path, for one service or all.
pub fn stats_path(service: Option<&str>) -> String {
    match service {
        Some(s) => format!("/v1/stats?service={}", url_segment(s)),
        None => "/v1/stats".into(),
    }
}

fn backends_path(service: &str) -> String {
    format!("/v1/services/{}/backends", url_segment(service))
}

fn backend_path(service: &str, address: &str) -> String {
    format!("{}/{}", backends_path(service), url_segment(address))
}

/// The API's JSON, pretty-printed, with a final newline.
fn pretty(body: &Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(body)? + "\n")
}

/// A body as the API type it promises.
fn parse<T: DeserializeOwned>(body: Value, socket: &Path) -> anyhow::Result<T> {
    serde_json::from_value(body).map_err(|e| {
        anyhow!(
            "talking to the daemon on {}: unexpected answer: {e}",
            socket.display()
        )
    })
}

/// `GET path`, printed as the API's JSON or rendered by `render`.
async fn show<T: DeserializeOwned>(
    client: &Client,
    socket: &Path,
    path: &str,
    json: bool,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let body: Value = client.get(path).await?;
    if json {
        return print(&pretty(&body)?);
    }
    print(&render(&parse(body, socket)?))
}

/// "backend A" or "3 backends (A, B, C)".
fn backends_phrase(addresses: &[String]) -> String {
    match addresses {
        [one] => format!("backend {one}"),
        many => format!("{} backends ({})", many.len(), many.join(", ")),
    }
}

async fn execute(command: Admin, socket: &Path) -> anyhow::Result<()> {
    let client = Client::new(socket);
    let c = &client;
    match command {
        Admin::Service(ServiceCommand::Add(add)) => {
            let info: ServiceInfo = c.post("/v1/services", &add.to_request()).await?;
            print(&format!(
                "service {} added ({} {})\n",
                info.name, info.vip, info.protocol
            ))
        }
        Admin::Service(ServiceCommand::Rm { name }) => {
            c.delete(&format!("/v1/services/{}", url_segment(&name)))
                .await?;
            print(&format!("service {name} removed\n"))
        }
        Admin::Service(ServiceCommand::Ls(a)) => {
            show(c, socket, "/v1/services", a.json, |l: &Vec<ServiceInfo>| {
                format::services(l)
            })
            .await
        }
        Admin::Backend(BackendCommand::Add(add)) => {
            let _: Value = c
                .post(&backends_path(&add.service), &add.to_request())
                .await?;
            let weight = add
                .weight
                .map(|w| format!(" (weight {w})"))
                .unwrap_or_default();
            print(&format!(
                "{} added to {}{weight}\n",
                backends_phrase(&add.addresses),
                add.service
            ))
        }
        Admin::Backend(BackendCommand::Set(set)) => {
            let _: Value = c
                .put(&backends_path(&set.service), &set.to_request())
                .await?;
            print(&format!(
                "{} now has {}\n",
                set.service,
                if set.addresses.is_empty() {
                    "no backends".to_owned()
                } else {
                    backends_phrase(&set.addresses)
                }
            ))
        }
        Admin::Backend(BackendCommand::Rm(b)) => {
            c.delete(&backend_path(&b.service, &b.address)).await?;
            print(&format!(
                "backend {} removed from {}\n",
                b.address, b.service
            ))
        }
        Admin::Backend(BackendCommand::Drain(b)) => {
            let path = format!("{}/drain", backend_path(&b.service, &b.address));
            let _: Value = c.post(&path, &serde_json::json!({})).await?;
            print(&format!(
                "backend {} of {} draining: keeps its flows, takes no new ones\n",
                b.address, b.service
            ))
        }
        Admin::Backend(BackendCommand::Undrain(b)) => {
            let path = format!("{}/undrain", backend_path(&b.service, &b.address));
            let _: Value = c.post(&path, &serde_json::json!({})).await?;
            print(&format!(
                "backend {} of {} active: takes new flows again\n",
                b.address, b.service
            ))
        }
        Admin::Backend(BackendCommand::Weight(w)) => {
            let path = format!("{}/weight", backend_path(&w.service, &w.address));
            let _: Value = c.put(&path, &Weight { weight: w.weight }).await?;
            print(&format!(
                "backend {} of {} weighs {}: new flows follow, established flows stay\n",
                w.address, w.service, w.weight
            ))
        }
        Admin::Backend(BackendCommand::Ls(l)) => {
            show(
                c,
                socket,
                &backends_path(&l.service),
                l.json.json,
                |b: &Vec<BackendInfo>| format::backends(b),
            )
            .await
        }
        Admin::Stats(s) if s.watch => watch(c, socket, &s).await,
        Admin::Stats(s) => {
            let all = s.service.is_none();
            show(
                c,
                socket,
                &stats_path(s.service.as_deref()),
                s.json,
                |st: &Stats| format::stats(st, None, false, all),
            )
            .await
        }
        Admin::Status(a) => {
            show(c, socket, "/v1/status", a.json, |s: &Status| {
                format::status(s)
            })
            .await
        }
        Admin::Events(a) => {
            tokio::select! {
                r = follow_events(c, socket, &a) => r,
                r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
            }
        }
        Admin::Completions(a) => completions(a.shell),
    }
}

/// `lb events`: each event as it comes, until the daemon ends the stream.
async fn follow_events(client: &Client, socket: &Path, args: &EventsArgs) -> anyhow::Result<()> {
    let mut lines = client.lines(&args.path()).await?;
    while let Some(line) = lines.next().await? {
        if args.json {
            print(&format!("{line}\n"))?;
        } else {
            let event: Event = parse(serde_json::from_str(&line)?, socket)?;
            print(&format::event(&event))?;
        }
    }
    Ok(())
}

/// ANSI: cursor home, then clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// `lb stats --watch`: a snapshot every interval until Ctrl-C, which ends
/// it with success.
async fn watch(client: &Client, socket: &Path, args: &StatsArgs) -> anyhow::Result<()> {
    tokio::select! {
        r = watch_frames(client, socket, args) => r,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
    }
}

/// The frames of `--watch`. On a terminal each frame replaces the last;
/// otherwise frames follow each other, separated by a blank line. With
/// `--json`, one line per snapshot from the second on (the first has
/// nothing to compute rates from).
async fn watch_frames(client: &Client, socket: &Path, args: &StatsArgs) -> anyhow::Result<()> {
    let path = stats_path(args.service.as_deref());
    let interval = args.interval();
    let tty = io::stdout().is_terminal();
    let all = args.service.is_none();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<(Stats, Instant)> = None;
    loop {
        tick.tick().await;
        let mut body: Value = client.get(&path).await?;
        let now = Instant::now();
        let stats: Stats = parse(body.clone(), socket)?;
        let rates = prev
            .as_ref()
            .map(|(p, at)| Rates::between(p, &stats, now - *at));
        if args.json {
            if let Some(r) = &rates {
                r.annotate(&mut body, &stats);
                print(&(serde_json::to_string(&body)? + "\n"))?;
            }
        } else {
            let table = format::stats(&stats, rates.as_ref(), true, all);
            let frame = if tty {
                format!(
                    "{CLEAR}every {}, Ctrl-C to quit\n\n{table}",
                    seconds(interval)
                )
            } else if prev.is_none() {
                table
            } else {
                format!("\n{table}")
            };
            print(&frame)?;
        }
        prev = Some((stats, now));
    }
}

/// `1s`, `0.5s`.
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests;
