//! The connection every Redis command goes through: one server (a `ConnectionManager` that
//! reconnects) or a cluster, counting its round trips.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::RedisStoreError;

pub(super) async fn cluster<'a>(
    nodes: impl Iterator<Item = &'a str>,
    timeout: Duration,
) -> Result<ClusterConnection, RedisStoreError> {
    let client = ClusterClient::builder(nodes.collect::<Vec<_>>())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(2)
        .build()?;
    Ok(client.get_async_connection().await?)
}

#[derive(Clone)]
pub(super) enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection to the store's server or cluster that counts its round trips.
///
/// It implements the driver's [`ConnectionLike`], so any `redis` command runs on it:
///
/// ```no_run
/// # async fn demo(store: &racefree_runtime::redis::RedisStore) -> Result<(), Box<dyn std::error::Error>> {
/// use racefree_runtime::redis::driver;
/// let mut conn = store.connection().await?;
/// let n: i64 = driver::cmd("INCR").arg("visits").query_async(&mut conn).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    inner: Inner,
    round_trips: Arc<AtomicU64>,
}

impl Connection {
    pub(super) fn new(inner: Inner) -> Self {
        Connection {
            inner,
            round_trips: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Round trips made through this connection and its clones.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Relaxed)
    }

    /// `true` when connected to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, Inner::Cluster(_))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.round_trips.fetch_add(1, Relaxed);
        match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.round_trips.fetch_add(1, Relaxed);
        match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster(conn) => conn.get_db(),
        }
    }
}
