//! The Redis store against bare Redis commands on the same connection, in one short run:
//! - round trips per operation, counted by the store's connection and cross-checked with
//!   `INFO commandstats` (targets: replay 1, first execution 2, sequenced call 1: the calls come
//!   back to back, so each takes the lock the previous one kept, see `StoreOptions::keep`);
//! - latency of each operation as a ratio of a bare `GET` and a bare `INCR`;
//! - how long an `#[idempotent]` duplicate waiting in another process (another store) takes to
//!   return after the owner's body returned (its completion still to be written: at least one
//!   round trip) and after the owner's completion returned, in microseconds and in bare `GET`s
//!   (the target: a median of at most 2 round trips).
//!
//! `cargo bench --bench redis --features redis` (about 30 s). It runs against a private
//! `redis-server` it starts on a free loopback port (and stops at the end), so the shared server
//! is left as it was; `REDIS_URL` points it at another server instead. Under `cargo test` each
//! benchmark runs once and the summary uses a few iterations.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use racefree::redis::driver::{self, AsyncCommands};
use racefree::redis::{
    CacheOptions, Connection, IdempotencyOptions, RedisKey, RedisStore, SequenceOptions,
};
use tokio::runtime::Runtime;

mod support;

static UNIQUE: AtomicU64 = AtomicU64::new(0);

struct Bench {
    store: RedisStore,
    run: String,
}

impl Bench {
    fn key(&self, what: &str, fixed: bool) -> RedisKey {
        let n = if fixed {
            0
        } else {
            UNIQUE.fetch_add(1, Ordering::Relaxed) + 1
        };
        RedisKey::new("benches::redis", Some(&self.run), format!("{what}-{n}"))
    }

    async fn conn(&self) -> Connection {
        self.store
            .connection()
            .await
            .expect("the bench's Redis server")
    }

    async fn get(&self) {
        let _: Option<String> = self
            .conn()
            .await
            .get(format!("{}:bare", self.run))
            .await
            .unwrap();
    }

    async fn incr(&self) {
        let _: i64 = self
            .conn()
            .await
            .incr(format!("{}:bare-incr", self.run), 1)
            .await
            .unwrap();
    }

    async fn replay(&self) {
        let key = self.key("idem", true);
        let outcome = self
            .store
            .idempotency()
            .run(&key, "fp", IdempotencyOptions::new(), || async {
                Ok::<_, String>(black_box(42u64))
            })
            .await
            .unwrap();
        black_box(outcome);
    }

    async fn first_execution(&self) {
        let key = self.key("idem", false);
        let opts = IdempotencyOptions {
            ttl: Duration::from_secs(60),
            ..IdempotencyOptions::new()
        };
        let outcome = self
            .store
            .idempotency()
            .run(&key, "fp", opts, || async {
                Ok::<_, String>(black_box(42u64))
            })
            .await;
        black_box(outcome.unwrap());
    }

    async fn sequenced(&self) {
        let key = self.key("seq", true);
        let n = self
            .store
            .sequences()
            .run(&key, 1, SequenceOptions::default(), |t| async move {
                Ok::<_, String>(t.number())
            })
            .await;
        black_box(n.unwrap());
    }

    async fn cache_hit(&self) {
        let key = self.key("cache", true);
        let v = self
            .store
            .cache()
            .get_or_compute(
                &key,
                CacheOptions::new(Duration::from_secs(600)),
                || async { Ok::<_, String>(7u64) },
            )
            .await;
        black_box(v.unwrap());
    }

    async fn cache_miss(&self) {
        let key = self.key("cache", false);
        let v = self
            .store
            .cache()
            .get_or_compute(&key, CacheOptions::new(Duration::from_secs(60)), || async {
                Ok::<_, String>(7u64)
            })
            .await;
        black_box(v.unwrap());
    }
}

type Op = for<'a> fn(&'a Bench) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;

fn ops() -> Vec<(&'static str, Op)> {
    vec![
        ("bare GET", |b| Box::pin(b.get())),
        ("bare INCR", |b| Box::pin(b.incr())),
        ("idempotent replay", |b| Box::pin(b.replay())),
        ("idempotent first execution", |b| {
            Box::pin(b.first_execution())
        }),
        ("sequenced call", |b| Box::pin(b.sequenced())),
        ("cached hit", |b| Box::pin(b.cache_hit())),
        ("cached miss (compute + fill)", |b| Box::pin(b.cache_miss())),
    ]
}

/// Redis's own count of executed commands (every `cmdstat_*` line's `calls`).
async fn server_calls(conn: &mut Connection) -> HashMap<String, u64> {
    let info: String = driver::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Round trips and latency of every operation. Operations are timed in interleaved batches
/// and each reports its median batch, so that load from elsewhere on the machine hits all of
/// them alike instead of skewing the ratios.
fn summary(rt: &Runtime, bench: &Bench, batches: u32, batch: u32) -> f64 {
    let ops = ops();
    let mut trips = vec![0u64; ops.len()];
    let mut commands = vec![HashMap::<String, u64>::new(); ops.len()];
    let mut times = vec![Vec::new(); ops.len()];
    rt.block_on(async {
        // Warm up: connect, load the scripts, create the fixed keys.
        for (_, op) in &ops {
            op(bench).await;
            op(bench).await;
        }
        let mut admin = bench.conn().await;
        for _ in 0..batches {
            for (i, (_, op)) in ops.iter().enumerate() {
                let before_calls = server_calls(&mut admin).await;
                let before = bench.store.round_trips();
                let started = Instant::now();
                for _ in 0..batch {
                    op(bench).await;
                }
                times[i].push(started.elapsed() / batch);
                trips[i] += bench.store.round_trips() - before;
                for (cmd, n) in server_calls(&mut admin).await {
                    let d = n - before_calls.get(&cmd).copied().unwrap_or(0);
                    let d = if cmd == "info" {
                        d.saturating_sub(1)
                    } else {
                        d
                    };
                    *commands[i].entry(cmd).or_default() += d;
                }
            }
        }
    });
    let calls = f64::from(batches * batch);
    let median = |t: &mut Vec<Duration>| {
        t.sort();
        t[t.len() / 2].as_secs_f64()
    };
    let latency: Vec<f64> = times.iter_mut().map(median).collect();
    let (get, incr) = (latency[0], latency[1]);
    println!(
        "\nRedis store: {batches} interleaved batches of {batch} sequential calls, one connection"
    );
    println!(
        "{:<30} {:>11} {:>10} {:>7} {:>7}  server commands per call",
        "", "round trips", "latency", "÷ GET", "÷ INCR"
    );
    for (i, (name, _)) in ops.iter().enumerate() {
        let mut cmds: Vec<String> = commands[i]
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(cmd, n)| format!("{cmd} {:.2}", *n as f64 / calls))
            .collect();
        cmds.sort();
        let group = "redis/per call (vs bare GET and INCR)";
        support::figure(
            group,
            &format!("{name} round trips"),
            trips[i] as f64 / calls,
            "round trips",
        );
        support::figure(
            group,
            &format!("{name} latency ÷ GET"),
            latency[i] / get,
            "x",
        );
        support::figure(
            group,
            &format!("{name} latency ÷ INCR"),
            latency[i] / incr,
            "x",
        );
        println!(
            "{name:<30} {:>11.2} {:>8.1}µs {:>6.2}x {:>6.2}x  {}",
            trips[i] as f64 / calls,
            latency[i] * 1e6,
            latency[i] / get,
            latency[i] / incr,
            cmds.join(", ")
        );
    }
    println!();
    get
}

/// Rounds of the wake-up measurement.
const WAKE_ROUNDS: u32 = 20;

/// An owner executes a key (its body parked until a waiter on `other`, another store as another
/// process would be, has begun waiting); the waiter replays. The delays from the owner's body
/// returning and from its completion returning to the waiter's return (0 if the waiter was
/// first), medians of `rounds`, as figures in µs and in bare `GET` latencies (`get`, seconds).
fn wake_up(rt: &Runtime, bench: &Bench, other: &RedisStore, rounds: u32, get: f64) {
    let (mut after_body, mut after_completion) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..rounds {
            let key = bench.key("wake", false);
            let (claimed, claimed_rx) = tokio::sync::oneshot::channel();
            let body_returned = std::sync::Mutex::new(None);
            let owner = async {
                bench
                    .store
                    .idempotency()
                    .run(&key, "fp", IdempotencyOptions::new(), || async {
                        let _ = claimed.send(());
                        // Long enough for the waiter to claim, find it running and subscribe.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        *body_returned.lock().unwrap() = Some(Instant::now());
                        Ok::<_, String>(1u64)
                    })
                    .await
                    .unwrap();
                Instant::now()
            };
            let waiter = async {
                claimed_rx.await.unwrap();
                let outcome = other
                    .idempotency()
                    .run(&key, "fp", IdempotencyOptions::new(), || async {
                        Err::<u64, String>("the duplicate executed".into())
                    })
                    .await
                    .unwrap();
                assert!(outcome.replayed, "the waiter replays");
                Instant::now()
            };
            let (completed, returned) = tokio::join!(owner, waiter);
            let body = body_returned.lock().unwrap().expect("the body ran");
            after_body.push(returned.saturating_duration_since(body));
            after_completion.push(returned.saturating_duration_since(completed));
        }
    });
    let group = "redis/waiter wake-up";
    for (from, delays) in [
        ("owner's body", &mut after_body),
        ("owner's completion", &mut after_completion),
    ] {
        delays.sort();
        let median = delays[delays.len() / 2].as_secs_f64();
        support::figure(
            group,
            &format!("median after the {from}"),
            median * 1e6,
            "µs",
        );
        let name = format!("median after the {from} ÷ bare GET");
        support::figure(group, &name, median / get, "round trips");
        println!(
            "waiter wake-up after the {from} ({rounds} rounds): median {:.1}µs = {:.2} bare GETs",
            median * 1e6,
            median / get
        );
    }
    println!();
}

/// A `redis-server` of this run's own, stopped when dropped.
struct PrivateServer(std::process::Child);

impl PrivateServer {
    fn start() -> (PrivateServer, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(std::env::temp_dir())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (bash .ci/redis.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (PrivateServer(child), format!("redis://127.0.0.1:{port}/"))
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_server, url) = match std::env::var("REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let (server, url) = PrivateServer::start();
            (Some(server), url)
        }
    };
    let other = RedisStore::new(url.clone());
    let bench = Bench {
        store: RedisStore::new(url),
        run: format!(
            "bench-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ),
    };
    let get = if full {
        summary(&rt, &bench, 20, 100)
    } else {
        summary(&rt, &bench, 2, 5)
    };
    wake_up(&rt, &bench, &other, if full { WAKE_ROUNDS } else { 3 }, get);

    let mut criterion = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let mut group = criterion.benchmark_group("redis");
    for (name, op) in ops() {
        group.bench_function(name, |b| b.to_async(&rt).iter(|| op(&bench)));
    }
    group.finish();
    criterion.final_summary();
}
