//! The race lab with the `metrics` feature: runs every scenario of `examples/race_lab` (naive
//! then racefree) with a recorder installed, then prints every racefree metric the run left,
//! per function and store: hits, coalesced waits, executions, replays, conflicts, evictions,
//! store errors, and the lock and flight waits (sample count, mean, max).
//!
//! ```text
//! cargo run --release --features metrics,sqlite,postgres --example race_lab_metrics
//! cargo run --release --features metrics,sqlite,postgres --example race_lab_metrics -- --database-url postgres://postgres@127.0.0.1/test
//! ```
//! An application installs its exporter here instead (`metrics-exporter-prometheus`, ...);
//! this example uses `metrics-util`'s `DebuggingRecorder` to print what an exporter would
//! see. Exits non-zero if a racefree row showed the race.

#[path = "race_lab/lab.rs"]
mod lab;

use std::collections::BTreeMap;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// What one metric of one function on one store came to.
enum Value {
    Count(u64),
    Seconds(Vec<f64>),
}

fn main() {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--database-url", Some(url)) if url.starts_with("postgres") => {
                lab::db::use_database(url)
            }
            _ => {
                eprintln!("usage: race_lab_metrics [--database-url postgres://...]");
                std::process::exit(2);
            }
        }
    }

    // Before the first call: handles are registered on a function's first call.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("no other recorder is installed in this example");

    let mut broken = Vec::new();
    for scenario in lab::SCENARIOS {
        let row = scenario.run();
        eprintln!(
            "{:<20} {:>4} callers  racefree: {} {}",
            row.scenario,
            row.callers,
            if row.racefree.holds { "ok  " } else { "RACE" },
            row.racefree.observed
        );
        if !row.racefree.holds {
            broken.push(row.scenario);
        }
    }

    let mut values: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if !key.name().starts_with("racefree_") {
            continue;
        }
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map_or_else(String::new, |l| l.value().to_owned())
        };
        let mut metric = key.name().to_owned();
        let kind = label("kind");
        if !kind.is_empty() {
            metric = format!("{metric}{{kind={kind}}}");
        }
        let value = match value {
            DebugValue::Counter(0) => continue,
            DebugValue::Counter(n) => Value::Count(n),
            DebugValue::Histogram(samples) if samples.is_empty() => continue,
            DebugValue::Histogram(samples) => {
                Value::Seconds(samples.iter().map(|s| s.into_inner()).collect())
            }
            DebugValue::Gauge(_) => continue,
        };
        values.insert((metric, label("function"), label("store")), value);
    }

    println!("\n{:<48} {:<52} {:<8} value", "metric", "function", "store");
    for ((metric, function, store), value) in &values {
        let value = match value {
            Value::Count(n) => n.to_string(),
            Value::Seconds(samples) => {
                let max = samples.iter().copied().fold(0.0, f64::max);
                let mean = samples.iter().sum::<f64>() / samples.len() as f64;
                format!(
                    "{} waits, mean {:.3} ms, max {:.3} ms",
                    samples.len(),
                    mean * 1e3,
                    max * 1e3
                )
            }
        };
        println!("{metric:<48} {function:<52} {store:<8} {value}");
    }
    println!("\ndatabase scenarios ran on {}.", lab::db::describe());
    if !broken.is_empty() {
        eprintln!("racefree showed the race in: {}", broken.join(", "));
        std::process::exit(1);
    }
}
