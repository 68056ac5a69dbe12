//! Turns the results of `cargo bench` into the comparison report: a markdown table of ratios
//! (each peer against racefree, same run) and an SVG chart, plus the figures the benches record
//! that are not timings (executions under a stampede, wall time of false blocking, memory).
//!
//! ```text
//! cargo bench && cargo run --example bench_report
//! ```
//! Reads `target/criterion/**/new/{benchmark,estimates}.json` and
//! `target/criterion/racefree-figures.jsonl`; writes `target/criterion/racefree-report.md` and
//! `target/criterion/racefree-report.svg`, and prints the markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

struct Row {
    function: String,
    mean_ns: f64,
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn collect(dir: &Path, groups: &mut BTreeMap<String, Vec<Row>>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let new = path.join("new");
        if let (Some(bench), Some(estimates)) = (
            read_json(&new.join("benchmark.json")),
            read_json(&new.join("estimates.json")),
        ) {
            let group = bench["group_id"].as_str().unwrap_or_default().to_owned();
            let function = bench["function_id"].as_str().unwrap_or_default().to_owned();
            if let Some(mean_ns) = estimates["mean"]["point_estimate"].as_f64() {
                groups
                    .entry(group)
                    .or_default()
                    .push(Row { function, mean_ns });
            }
        } else {
            collect(&path, groups);
        }
    }
}

/// Rows measuring racefree itself (the others are peers).
fn is_ours(function: &str) -> bool {
    function.starts_with("racefree")
        || function.starts_with("#[")
        || function.starts_with("Sequencer")
}

/// The row the group's ratios are taken against: plain `racefree` if the group has it, else
/// the first of ours.
fn baseline(rows: &[Row]) -> Option<&Row> {
    rows.iter()
        .find(|r| r.function == "racefree")
        .or_else(|| rows.iter().find(|r| is_ours(&r.function)))
}

fn human(ns: f64) -> String {
    match ns {
        n if n >= 1e6 => format!("{:.2} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.2} µs", n / 1e3),
        n => format!("{n:.1} ns"),
    }
}

fn main() {
    let dir = criterion_dir();
    let mut groups = BTreeMap::new();
    collect(&dir, &mut groups);
    if groups.is_empty() {
        eprintln!(
            "no criterion results under {}: run `cargo bench` first",
            dir.display()
        );
        std::process::exit(1);
    }

    let mut md = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let machine = format!("{cores} cores ({cpu}), {rustc}");
    writeln!(md, "Measured on: {machine}. Ratio = row time / the group's first racefree row, same run (a peer above 1: racefree is faster).\n").unwrap();
    writeln!(md, "| benchmark | contender | mean | ratio vs racefree |").unwrap();
    writeln!(md, "|---|---|---:|---:|").unwrap();
    for (group, rows) in &mut groups {
        rows.sort_by(|a, b| {
            (!is_ours(&a.function), &a.function).cmp(&(!is_ours(&b.function), &b.function))
        });
        let base = baseline(rows).map(|r| r.mean_ns);
        for row in rows.iter() {
            let ratio = base
                .map(|b| format!("{:.2}×", row.mean_ns / b))
                .unwrap_or_default();
            writeln!(
                md,
                "| {group} | {} | {} | {ratio} |",
                row.function,
                human(row.mean_ns)
            )
            .unwrap();
        }
    }

    // Figures: the last value recorded for each (group, name).
    let mut figures: BTreeMap<(String, String), (f64, String)> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("racefree-figures.jsonl")) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                let key = (
                    v["group"].as_str().unwrap_or_default().to_owned(),
                    v["name"].as_str().unwrap_or_default().to_owned(),
                );
                figures.insert(
                    key,
                    (
                        v["value"].as_f64().unwrap_or(f64::NAN),
                        v["unit"].as_str().unwrap_or_default().to_owned(),
                    ),
                );
            }
        }
    }
    if !figures.is_empty() {
        writeln!(md, "\n| figure | contender | value |").unwrap();
        writeln!(md, "|---|---|---:|").unwrap();
        for ((group, name), (value, unit)) in &figures {
            let value = if value.fract() == 0.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.2}")
            };
            writeln!(md, "| {group} | {name} | {value} {unit} |").unwrap();
        }
    }

    std::fs::write(dir.join("racefree-report.md"), &md).unwrap();
    std::fs::write(dir.join("racefree-report.svg"), svg(&groups)).unwrap();
    print!("{md}");
    if std::env::args().any(|a| a == "--readme") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).expect("docs/");
        std::fs::copy(dir.join("racefree-report.svg"), docs.join("benchmarks.svg"))
            .expect("copy the SVG");
        update_readme(&format!(
            "{md}\n![Benchmarks, log scale: racefree in green](docs/benchmarks.svg)\n"
        ));
    }
    eprintln!(
        "\nwrote {} and racefree-report.svg",
        dir.join("racefree-report.md").display()
    );
}

/// One panel per group: a bar per contender, length ∝ log10(time), racefree in green.
fn svg(groups: &BTreeMap<String, Vec<Row>>) -> String {
    let bar_h = 18.0;
    let width = 760.0;
    let label_w = 230.0;
    let rows: usize = groups.values().map(|r| r.len() + 2).sum();
    let height = rows as f64 * bar_h + 20.0;
    let max = groups
        .values()
        .flatten()
        .map(|r| r.mean_ns)
        .fold(1.0f64, f64::max)
        .log10()
        + 0.5;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"monospace\" font-size=\"12\">\n"
    );
    let mut y = 10.0;
    for (group, rows) in groups {
        writeln!(
            s,
            "<text x=\"4\" y=\"{:.0}\" font-weight=\"bold\">{}</text>",
            y + 13.0,
            escape(group)
        )
        .unwrap();
        y += bar_h;
        for row in rows {
            let len = ((row.mean_ns.max(1.0).log10() + 0.5) / max) * (width - label_w - 90.0);
            let color = if is_ours(&row.function) {
                "#2a9d4b"
            } else {
                "#8a8a8a"
            };
            writeln!(
                s,
                "<text x=\"14\" y=\"{:.0}\">{}</text><rect x=\"{label_w}\" y=\"{:.0}\" width=\"{len:.0}\" height=\"{:.0}\" fill=\"{color}\"/><text x=\"{:.0}\" y=\"{:.0}\">{}</text>",
                y + 13.0,
                escape(&row.function),
                y + 3.0,
                bar_h - 5.0,
                label_w + len + 4.0,
                y + 13.0,
                human(row.mean_ns)
            )
            .unwrap();
            y += bar_h;
        }
        y += bar_h;
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Puts the report between the README's `<!-- bench-table -->` and `<!-- /bench-table -->`.
fn update_readme(md: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let (start, end) = ("<!-- bench-table -->", "<!-- /bench-table -->");
    let (Some(from), Some(to)) = (readme.find(start), readme.find(end)) else {
        eprintln!("README.md has no {start} … {end} markers");
        std::process::exit(1);
    };
    let updated = format!("{}{start}\n{md}{}", &readme[..from], &readme[to..]);
    std::fs::write(&path, updated).expect("write README.md");
    eprintln!("updated {}", path.display());
}
