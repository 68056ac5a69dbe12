//! Real Redis for the tests: a `redis-server` of this test binary's own on a free local port
//! (so the suite leaves nothing in the shared server at 127.0.0.1:6379), private servers that
//! a fault test starts, restarts and stops itself, and a throwaway 3-node Redis Cluster. Fails
//! loudly when no server can be had: these tests must never pass by skipping.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A Redis server the tests may use.
pub struct Server {
    pub url: String,
    // A spawned server lives as long as this process: its watchdog shell kills it when our end
    // of its stdin closes, which happens however this process exits.
    _child: Option<Child>,
}

/// This test binary's single-node server: `RACEFREE_TEST_REDIS` if set, else a fresh
/// `redis-server` on a free port (never the shared 127.0.0.1:6379: tests leave it untouched).
pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("RACEFREE_TEST_REDIS") {
            return Server { url, _child: None };
        }
        let port = free_port();
        let child = spawn_redis(port, &[]);
        wait_for(port);
        Server {
            url: format!("redis://127.0.0.1:{port}/"),
            _child: Some(child),
        }
    })
}

/// A 3-node Redis Cluster on free local ports, torn down on drop.
pub struct Cluster {
    pub nodes: Vec<String>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// A cluster whose nodes all run with `extra` arguments.
    pub fn start_with(extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir for cluster config files");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let children: Vec<Child> = ports
            .iter()
            .map(|port| {
                let config = dir.path().join(format!("nodes-{port}.conf"));
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    config.to_str().unwrap(),
                ];
                args.extend_from_slice(extra);
                spawn_redis(*port, &args)
            })
            .collect();
        for port in &ports {
            wait_for(*port);
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (see .ci/redis.sh)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Wait until every node agrees the cluster is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in &ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster on {ports:?} did not reach cluster_state:ok"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster {
            nodes: ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}/"))
                .collect(),
            children,
            _dir: dir,
        }
    }
}

impl Cluster {
    /// Runs `redis-cli <args>` against every node.
    pub fn cli_all(&self, args: &[&str]) {
        for url in &self.nodes {
            let port = url.trim_end_matches('/').rsplit(':').next().unwrap();
            Command::new("redis-cli")
                .args(["-p", port])
                .args(args)
                .output()
                .expect("redis-cli must be installed (see .ci/redis.sh)");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Closing a node's stdin makes its watchdog shell stop the server and exit. (Killing the
        // shell instead would orphan the server.)
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

/// A `redis-server` one fault test owns: started with extra arguments, restarted on the same
/// port (without persistence: it comes back empty), stopped on drop.
pub struct Private {
    pub port: u16,
    pub url: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Private {
    pub fn start(extra: &[&str]) -> Private {
        let port = free_port();
        let args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = spawn_redis(port, extra);
        wait_for(port);
        Private {
            port,
            url: format!("redis://127.0.0.1:{port}/"),
            args,
            child: Some(child),
        }
    }

    /// Stops the server and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not stop",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server and starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Some(spawn_redis(self.port, &args));
        wait_for(self.port);
    }

    /// Runs `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed (see .ci/redis.sh)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{name}-{}-{nanos}", std::process::id())
}

fn spawn_redis(port: u16, extra: &[&str]) -> Child {
    let mut args = vec![
        "--port".to_owned(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        "''".into(),
        "--appendonly".into(),
        "no".into(),
        "--daemonize".into(),
        "no".into(),
        // Anything a test makes it write (a restart's snapshot) goes to the temp dir, not the
        // checkout.
        "--dir".into(),
        std::env::temp_dir().display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    // The shell waits for EOF on stdin (our end closes when this process dies, even by
    // SIGKILL) and then kills the server, so no test leaves a server behind.
    let script = format!(
        "redis-server {} >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid 2>/dev/null; wait $pid",
        args.join(" ")
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot run `sh` to start redis-server")
}

fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(port) {
        assert!(
            Instant::now() < deadline,
            "redis-server did not answer on 127.0.0.1:{port}; is it installed? (.ci/redis.sh installs it)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

fn free_port() -> u16 {
    // Cluster nodes also listen on port + 10000, so stay below 55535.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A loopback TCP proxy in front of a server that can make replies slow: while
/// [`delay_replies`](Proxy::delay_replies) is set, every chunk the server sends is handed to the
/// client that much later (in order, as on a slow link); the requests pass at once, so the
/// server executes them on time. Runs on the caller's Tokio runtime; stops when dropped.
pub struct Proxy {
    pub url: String,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = Arc::clone(&delay_ms);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                // Replies: read as they come, stamped with the delay in force on arrival, and
                // written in order once that delay has passed.
                let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel();
                let delay = Arc::clone(&delay);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = server_rx.read(&mut buf).await {
                        let due = tokio::time::Instant::now()
                            + Duration::from_millis(delay.load(Relaxed));
                        if queue.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((due, chunk)) = queued.recv().await {
                        tokio::time::sleep_until(due).await;
                        if client_tx.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Proxy {
            url: format!("redis://127.0.0.1:{port}/"),
            delay_ms,
            task,
        }
    }

    /// Replies arriving from now on reach the client `delay` late (zero: at once again).
    pub fn delay_replies(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(feature = "redis")]
/// The lock wake-up channels that have a subscriber now (`PUBSUB CHANNELS`; a `PSUBSCRIBE`
/// pattern is not listed).
pub async fn subscribed(conn: &mut racefree::redis::Connection, shop: &str) -> Vec<String> {
    racefree::redis::driver::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("*{shop}*:lock:wake"))
        .query_async(conn)
        .await
        .unwrap()
}

#[cfg(feature = "redis")]
/// Yields until the waiter on `shop` is subscribed to the key's wake-up channel.
pub async fn until_subscribed(conn: &mut racefree::redis::Connection, shop: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribed(conn, shop).await.is_empty() {
        assert!(Instant::now() < deadline, "{what}: never subscribed");
        tokio::task::yield_now().await;
    }
}
