//! The race lab: every classic race reproduced with the naive code and fixed by one attribute,
//! side by side, with numbers.
//!
//! ```text
//! cargo run --release --example race_lab --features sqlite,postgres              # the table
//! cargo run --release --example race_lab --features sqlite,postgres -- --json    # as JSON
//! cargo run --release --example race_lab --features sqlite,postgres -- --scenario inventory
//! cargo run --release --example race_lab --features sqlite,postgres -- \
//!     --database-url postgres://postgres@127.0.0.1/test
//! ```
//! The database scenarios run on a fresh SQLite file by default (sqlx bundles SQLite: nothing
//! to install), or in a fresh schema of the PostgreSQL given by `--database-url` (dropped
//! afterwards); their racefree rows use racefree's SQL store of that database, so the record
//! or the number commits in the same transaction as the effect.
//! Exits non-zero if a racefree row ever shows the race.

mod lab;

use std::io::{IsTerminal, Write};
use std::time::Duration;

use lab::{Row, SCENARIOS};

fn main() {
    let mut json = false;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--scenario" => only = args.next(),
            "--database-url" => match args.next() {
                Some(url) if url.starts_with("postgres") => lab::db::use_database(url),
                _ => {
                    eprintln!("--database-url takes a postgres://... URL");
                    std::process::exit(2);
                }
            },
            "--list" => {
                SCENARIOS.iter().for_each(|s| println!("{}", s.name));
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}; use --json, --scenario NAME, --database-url URL, --list");
                std::process::exit(2);
            }
        }
    }
    let chosen: Vec<_> = SCENARIOS
        .iter()
        .filter(|s| only.as_deref().is_none_or(|name| s.name == name))
        .collect();
    if chosen.is_empty() {
        let names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
        eprintln!(
            "no scenario {:?}; there are: {}",
            only.unwrap_or_default(),
            names.join(", ")
        );
        std::process::exit(2);
    }

    // Progress on stderr: one line rewritten in place on a terminal, a line per scenario elsewhere.
    let terminal = std::io::stderr().is_terminal();
    let mut rows = Vec::new();
    for (i, scenario) in chosen.iter().enumerate() {
        let line = format!(
            "[{}/{}] {} ({} callers, naive then racefree)",
            i + 1,
            chosen.len(),
            scenario.name,
            scenario.callers
        );
        if terminal {
            eprint!("\r\x1b[2K{line}…");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
        rows.push(scenario.run());
    }
    if terminal {
        eprint!("\r\x1b[2K");
    }

    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&rows)).expect("json")
        );
    } else {
        print_table(&rows);
    }
    let broken: Vec<_> = rows
        .iter()
        .filter(|r| !r.racefree.holds)
        .map(|r| r.scenario)
        .collect();
    if !broken.is_empty() {
        eprintln!("racefree showed the race in: {}", broken.join(", "));
        std::process::exit(1);
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mark(holds: bool) -> &'static str {
    if holds {
        "ok  "
    } else {
        "RACE"
    }
}

fn print_table(rows: &[Row]) {
    let w = |rows: &[Row], f: fn(&Row) -> String, min: usize| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .max()
            .unwrap_or(0)
            .max(min)
    };
    let (ws, wm, wn, wr) = (
        w(rows, |r| r.scenario.to_owned(), 8),
        w(rows, |r| r.must_hold.to_owned(), 10),
        w(rows, |r| r.naive.observed.clone(), 5) + 5,
        w(rows, |r| r.racefree.observed.clone(), 8) + 5,
    );
    println!(
        "{:<ws$}  {:>7}  {:<wm$}  {:<wn$}  {:<wr$}  {:>10}  {:>10}",
        "scenario", "callers", "must hold", "naive", "racefree", "naive", "racefree"
    );
    for r in rows {
        println!(
            "{:<ws$}  {:>7}  {:<wm$}  {:<wn$}  {:<wr$}  {:>10}  {:>10}",
            r.scenario,
            r.callers,
            r.must_hold,
            format!("{} {}", mark(r.naive.holds), r.naive.observed),
            format!("{} {}", mark(r.racefree.holds), r.racefree.observed),
            ms(r.naive.elapsed),
            ms(r.racefree.elapsed),
        );
    }
    println!("\ndatabase scenarios ran on {}.", lab::db::describe());
    let raced = rows.iter().filter(|r| !r.naive.holds).count();
    let held = rows.iter().filter(|r| r.racefree.holds).count();
    println!(
        "\nnaive code showed the race in {raced} of {} scenarios; racefree held in {held} of {}.",
        rows.len(),
        rows.len()
    );
}

fn to_json(rows: &[Row]) -> serde_json::Value {
    let side = |s: &lab::Side| serde_json::json!({ "holds": s.holds, "observed": s.observed, "ms": s.elapsed.as_secs_f64() * 1e3 });
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "scenario": r.scenario,
                    "callers": r.callers,
                    "must_hold": r.must_hold,
                    "naive": side(&r.naive),
                    "racefree": side(&r.racefree),
                })
            })
            .collect(),
    )
}
