//! What an outsider controls: the key, the scope's text, the payload. Keys and scopes are
//! bounded before any store sees them; fingerprints are the same in every process (so a shared
//! store can compare them) and are not XXH3 any more (see `fingerprint.rs` for why).

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use racefree::{idempotent, Fingerprint, IdempotencyError};

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = key, scope = tenant, skip(tenant))]
fn charge(tenant: &str, key: &str, cents: u64) -> Result<u64, IdempotencyError> {
    RUNS.fetch_add(1, SeqCst);
    Ok(cents)
}

#[test]
fn over_long_key_or_scope_is_refused_before_the_body_runs() {
    let before = RUNS.load(SeqCst);
    let long_key = "k".repeat(256);
    assert_eq!(
        charge("acme", &long_key, 1),
        Err(IdempotencyError::KeyTooLong { len: 256, max: 255 })
    );
    let long_tenant = "t".repeat(300);
    assert_eq!(
        charge(&long_tenant, "k-1", 1),
        Err(IdempotencyError::KeyTooLong { len: 300, max: 255 })
    );
    assert_eq!(RUNS.load(SeqCst), before, "nothing ran");
    assert_eq!(
        IdempotencyError::KeyTooLong { len: 256, max: 255 }.http_status(),
        400
    );
    // At the bound, both are accepted.
    assert_eq!(charge(&"t".repeat(255), &"k".repeat(255), 2), Ok(2));
    assert_eq!(RUNS.load(SeqCst), before + 1);
}

#[test]
fn one_key_in_two_scopes_is_two_records() {
    let before = RUNS.load(SeqCst);
    assert_eq!(charge("acme", "order-1", 10), Ok(10));
    assert_eq!(
        charge("globex", "order-1", 20),
        Ok(20),
        "no Conflict across scopes"
    );
    assert_eq!(charge("acme", "order-1", 10), Ok(10), "replayed");
    assert_eq!(RUNS.load(SeqCst), before + 2);
}

const CHILD: &str = "RACEFREE_FINGERPRINT_CHILD";

fn request_fingerprint() -> Fingerprint {
    Fingerprint::of(&(
        "ward-3",
        48_u32,
        vec!["early".to_owned(), "late".to_owned()],
    ))
}

/// A second process (this test binary again) computes the same request's fingerprint: a
/// shared store compares fingerprints written by other processes and other builds.
#[test]
fn fingerprints_are_equal_across_processes() {
    if std::env::var_os(CHILD).is_some() {
        println!("fingerprint={}", request_fingerprint());
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fingerprints_are_equal_across_processes",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let theirs = stdout
        .lines()
        .find_map(|line| line.strip_prefix("fingerprint="))
        .expect("the child prints its fingerprint");
    assert_eq!(theirs, request_fingerprint().to_string());
    assert_ne!(
        request_fingerprint(),
        Fingerprint::of(&(
            "ward-3",
            49_u32,
            vec!["early".to_owned(), "late".to_owned()]
        ))
    );
}
