//! The cluster against a real etcd (Debian's etcd-server): membership,
//! each change of owner as a compare-and-swap on the fencing token, and
//! the fence closing before the lease can expire when etcd goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmm_cluster::{Cluster, ClusterConfig, ErrorKind, MovePhase, NodeRecord};
use dmm_testkit::Etcd;

async fn join(etcd: &Etcd, name: &str) -> Arc<Cluster> {
    Cluster::join(ClusterConfig {
        endpoints: vec![etcd.endpoint()],
        node: NodeRecord {
            name: name.to_owned(),
            api: Some(format!("{name}:7070")),
            nbd: None,
            free_bytes: 0,
            version: "test".to_owned(),
        },
        lease_ttl: Duration::from_secs(3),
        free_bytes: Box::new(|| 1 << 30),
    })
    .await
    .expect("join")
}

/// Waits until `check` holds, for at most `within`.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_changes_only_under_the_current_token() {
    let etcd = Etcd::start();
    let (a, b) = (join(&etcd, "node-a").await, join(&etcd, "node-b").await);
    let nodes = a.nodes().await.unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.up));
    assert_eq!(nodes[0].record.as_ref().unwrap().free_bytes, 1 << 30);

    let first = a.claim("vol", 1 << 20).await.unwrap();
    assert_eq!(
        a.claim("vol", 1 << 20).await.unwrap(),
        first,
        "a claim again"
    );
    let refused = b.claim("vol", 1 << 20).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Conflict);
    assert!(refused.to_string().contains("node-a owns it"), "{refused}");
    assert_eq!(a.serves("vol").unwrap(), first);

    let handed = a.hand_over("vol", first, "node-b").await.unwrap();
    assert!(handed > first);
    let stale = a.hand_over("vol", first, "node-c").await.unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Conflict);
    assert!(stale.to_string().contains("is not current"), "{stale}");
    let owner = b.owner("vol").await.unwrap().unwrap();
    assert_eq!((owner.node.as_str(), owner.token), ("node-b", handed));
    assert_eq!(owner.moving.unwrap().phase, MovePhase::Handed);
    // The source serves its export (which every request of the move goes
    // through) under the new token; a third node serves nothing.
    assert_eq!(a.serves("vol").unwrap(), handed);
    eventually(
        Duration::from_secs(2),
        "node-b sees it owns the volume",
        || b.serves("vol").ok() == Some(handed),
    )
    .await;

    // Rolled back: node-a owns it again under a newer token.
    let back = a.take_back("vol").await.unwrap();
    assert!(back > handed);
    assert_eq!(a.serves("vol").unwrap(), back);
    assert!(
        b.take_back("vol").await.is_err(),
        "only the sender takes back"
    );
    assert!(b.committed("vol").await.is_err(), "only the sender commits");

    // Moved again and committed: the token stays node-b's.
    let handed = a.hand_over("vol", back, "node-b").await.unwrap();
    a.committed("vol").await.unwrap();
    let owner = a.owner("vol").await.unwrap().unwrap();
    assert_eq!(owner.token, handed);
    assert_eq!(owner.moving.unwrap().phase, MovePhase::Committed);
    assert_eq!(
        a.take_back("vol").await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
    a.release("vol").await.unwrap();
    let owner = a.owner("vol").await.unwrap().unwrap();
    assert_eq!((owner.node.as_str(), owner.moving), ("node-b", None));
    assert_eq!(
        a.serves("vol").unwrap_err().kind(),
        ErrorKind::Conflict,
        "released"
    );
    b.release("vol").await.unwrap();
    assert_eq!(a.owner("vol").await.unwrap(), None);

    b.leave().await;
    let nodes = a.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "node-b left: {nodes:?}");
    a.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_closes_before_the_lease_can_expire() {
    let mut etcd = Etcd::start();
    let a = join(&etcd, "node-a").await;
    let token = a.claim("vol", 4096).await.unwrap();
    assert!(a.fence().is_open());

    let killed = Instant::now();
    etcd.kill();
    eventually(Duration::from_secs(3), "the fence closes", || {
        !a.fence().is_open()
    })
    .await;
    let closed_after = killed.elapsed();
    // Open until two thirds of the 3 s TTL after the last keep-alive was
    // sent, which was at most a sixth of the TTL before the kill.
    assert!(
        closed_after <= Duration::from_millis(2100),
        "closed after {closed_after:?}"
    );
    assert_eq!(a.serves("vol").unwrap_err().kind(), ErrorKind::Fenced);
    let started = Instant::now();
    let refused = a.claim("other", 4096).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unavailable, "{refused}");
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "bounded: {:?}",
        started.elapsed()
    );

    // etcd back: the node renews (or joins again under a new lease) and
    // still owns its volume under the same token.
    etcd.restart();
    eventually(Duration::from_secs(10), "the fence reopens", || {
        a.fence().is_open()
    })
    .await;
    assert_eq!(a.serves("vol").unwrap(), token);
    let nodes = a.nodes().await.unwrap();
    assert!(
        nodes.iter().any(|n| n.name == "node-a" && n.up),
        "{nodes:?}"
    );
    a.leave().await;
}
