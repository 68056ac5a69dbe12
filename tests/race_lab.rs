//! Runs the race lab (every scenario, naive then racefree, on the lab's own workloads) and
//! asserts that every racefree row holds what it must. The naive rows are the lab's business:
//! they show the race, and are not asserted here. The database scenarios run on SQLite here,
//! and on the machine's PostgreSQL in a child process (`.ci/postgres.sh` makes sure it runs).

use std::process::Command;

#[path = "../examples/race_lab/lab.rs"]
mod lab;

/// In a child process: the PostgreSQL URL the database scenarios use instead of SQLite.
const DATABASE_URL: &str = "RACE_LAB_DATABASE_URL";

#[test]
fn every_racefree_row_holds() {
    if let Ok(url) = std::env::var(DATABASE_URL) {
        lab::db::use_database(url);
    }
    for scenario in lab::SCENARIOS {
        let row = scenario.run();
        assert!(
            row.racefree.holds,
            "{} with {} callers on {} must hold \"{}\", but racefree observed: {}",
            row.scenario,
            row.callers,
            lab::db::describe(),
            row.must_hold,
            row.racefree.observed
        );
    }
}

#[test]
fn every_racefree_row_holds_on_postgres() {
    let url = std::env::var("RACEFREE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "every_racefree_row_holds", "--nocapture"])
        .env(DATABASE_URL, url)
        .status()
        .unwrap();
    assert!(status.success(), "the lab on PostgreSQL failed: {status}");
}
