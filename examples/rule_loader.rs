//! The seed scenario of `#[cached]`: four worker threads ask for the rule set (53 rule files)
//! at start-up. A check-then-act memoizer misses in all four and loads the files four times;
//! `#[cached]` loads them once and the other three wait for that load.
//!
//! `cargo run --release --example rule_loader`

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use racefree::cached;

const RULE_FILES: usize = 53;
const WORKERS: usize = 4;

static FILE_READS: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    name: String,
    pattern: String,
}

fn read_rules(dir: &Path) -> Vec<Rule> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|file| {
            FILE_READS.fetch_add(1, SeqCst);
            // Stands for the disk: a read that waits lets the other workers run meanwhile.
            std::thread::sleep(Duration::from_micros(100));
            let text = std::fs::read_to_string(file).unwrap();
            let (name, pattern) = text.split_once('=').unwrap();
            Rule {
                name: name.trim().to_owned(),
                pattern: pattern.trim().to_owned(),
            }
        })
        .collect()
}

/// The naive memoizer: check, miss, compute, store — without a per-key lock.
fn naive_load_rules(cache: &Mutex<HashMap<PathBuf, Arc<Vec<Rule>>>>, dir: &Path) -> Arc<Vec<Rule>> {
    if let Some(rules) = cache.lock().unwrap().get(dir) {
        return rules.clone();
    }
    let rules = Arc::new(read_rules(dir));
    cache.lock().unwrap().insert(dir.to_owned(), rules.clone());
    rules
}

#[cached]
fn load_rules(dir: &Path) -> Arc<Vec<Rule>> {
    Arc::new(read_rules(dir))
}

fn run_workers(load: impl Fn() -> Arc<Vec<Rule>> + Sync) -> (usize, Duration) {
    FILE_READS.store(0, SeqCst);
    let barrier = Barrier::new(WORKERS);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                barrier.wait();
                assert_eq!(load().len(), RULE_FILES);
            });
        }
    });
    (FILE_READS.load(SeqCst) / RULE_FILES, start.elapsed())
}

fn main() {
    let dir = std::env::temp_dir().join(format!("racefree-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..RULE_FILES {
        let body = format!("rule_{i:02} = {}", "(a|b)*c".repeat(2_000));
        std::fs::write(dir.join(format!("rule_{i:02}.rule")), body).unwrap();
    }

    let naive_cache = Mutex::new(HashMap::new());
    let (naive_loads, naive_time) = run_workers(|| naive_load_rules(&naive_cache, &dir));
    let (racefree_loads, racefree_time) = run_workers(|| load_rules(&dir));
    std::fs::remove_dir_all(&dir).unwrap();

    println!("{WORKERS} worker threads load {RULE_FILES} rule files at start-up");
    println!("{:<28} {:>12} {:>12}", "", "loads", "time");
    println!(
        "{:<28} {:>12} {:>12.2?}",
        "naive check-then-act", naive_loads, naive_time
    );
    println!(
        "{:<28} {:>12} {:>12.2?}",
        "#[cached]", racefree_loads, racefree_time
    );
    let stats = load_rules_cache().stats();
    println!(
        "#[cached] stats: {} execution, {} callers waited for it",
        stats.executions, stats.coalesced
    );
    if racefree_loads != 1 {
        eprintln!("#[cached] loaded the rules {racefree_loads} times");
        std::process::exit(1);
    }
}
