//! `#[sequenced(store = ...)]`: any `SequenceBackend` supplies the lock and the numbers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

use racefree::{sequenced, Seq, SequenceBackend, SequenceError, SequenceLease, Sequencer};
use racefree_runtime::sync::keyed_locks::Holder;
use racefree_runtime::LocalSequenceLease;

#[derive(Debug)]
struct Busy(SequenceError);

impl From<SequenceError> for Busy {
    fn from(error: SequenceError) -> Self {
        Busy(error)
    }
}

/// One sequence shared by two functions: web and phone orders draw from the same numbers.
static ORDERS: LazyLock<Sequencer<String>> = LazyLock::new(Sequencer::new);

#[sequenced(key = shop.to_owned(), store = *ORDERS)]
fn web_order(shop: &str, seq: Seq) -> Result<u64, Busy> {
    Ok(seq.get())
}

#[sequenced(key = shop.to_owned(), store = &*ORDERS)]
async fn phone_order(shop: &str, seq: Seq) -> Result<u64, Busy> {
    Ok(seq.get())
}

#[tokio::test]
async fn functions_sharing_a_store_share_the_sequence() {
    assert_eq!(web_order("porto").unwrap(), 1);
    assert_eq!(phone_order("porto").await.unwrap(), 2);
    assert_eq!(web_order("porto").unwrap(), 3);
    assert_eq!(ORDERS.next(&"porto".to_owned()), Some(4));
    assert!(ORDERS.is_idle());
}

struct Tills {
    sequence: Sequencer<u8>,
}

impl Tills {
    #[sequenced(key = till, store = self.sequence)]
    fn receipt(&self, till: u8, seq: Seq) -> Result<String, Busy> {
        Ok(format!("T{till}-{seq}"))
    }
}

#[test]
fn store_can_be_a_field() {
    let tills = Tills {
        sequence: Sequencer::new(),
    };
    assert_eq!(tills.receipt(1).unwrap(), "T1-1");
    assert_eq!(tills.receipt(1).unwrap(), "T1-2");
    assert_eq!(tills.sequence.next(&1), Some(3));
}

/// A store that works only asynchronously, as a networked one would: it implements the async
/// half of the contract and keeps the blocking defaults.
struct AsyncOnly {
    inner: Sequencer<u32>,
    acquired: AtomicUsize,
}

struct AsyncLease<'a>(LocalSequenceLease<'a, u32>);

impl SequenceBackend<u32> for AsyncOnly {
    type Lease<'a> = AsyncLease<'a>;

    async fn acquire_async(
        &self,
        key: u32,
        deadline: Option<Instant>,
    ) -> Result<AsyncLease<'_>, SequenceError> {
        let lease = self.inner.acquire_async(key, deadline).await?;
        self.acquired.fetch_add(1, Ordering::SeqCst);
        Ok(AsyncLease(lease))
    }
}

impl SequenceLease for AsyncLease<'_> {
    fn holder(&self) -> Holder {
        self.0.holder()
    }
    fn fence(&self) -> u64 {
        self.0.fence()
    }
    async fn next_async(&mut self) -> Result<Option<u64>, SequenceError> {
        self.0.next_async().await
    }
    async fn commit_async(self, used: u64) -> Result<(), SequenceError> {
        self.0.commit_async(used).await
    }
}

static REMOTE: LazyLock<AsyncOnly> = LazyLock::new(|| AsyncOnly {
    inner: Sequencer::new(),
    acquired: AtomicUsize::new(0),
});

#[sequenced(key = stream, store = *REMOTE, start = 1_000)]
async fn append_remote(stream: u32, seq: Seq) -> Result<u64, Busy> {
    Ok(seq.get())
}

#[sequenced(key = stream, store = *REMOTE)]
fn append_remote_blocking(stream: u32, seq: Seq) -> Result<u64, Busy> {
    Ok(seq.get())
}

#[tokio::test]
async fn a_custom_backend_drives_the_expansion() {
    assert_eq!(append_remote(1).await.unwrap(), 1_000);
    assert_eq!(append_remote(1).await.unwrap(), 1_001);
    assert_eq!(REMOTE.acquired.load(Ordering::SeqCst), 2);
    let error = append_remote_blocking(1).unwrap_err();
    assert!(
        matches!(error, Busy(SequenceError::Store(_))),
        "an async-only store refuses blocking calls: {error:?}"
    );
}
