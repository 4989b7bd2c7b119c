//! Model-based concurrency tests, one per strategy: clients read, write,
//! zero, discard and flush through the virtual device while the migration
//! runs; every read returns the latest acknowledged data, and after the
//! commit the destination store itself equals the model. Also rollback per
//! strategy (the source equals the model), non-convergence, and a crash in
//! the middle (the same migration reopened resumes, and every write made
//! durable by a flush or FUA before the crash is still there).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dmm_store::BlockStore;
use dmm_volume::{ErrorKind, Phase, Strategy};

async fn migrate_under_load(strategy: Strategy, load: Load) {
    let (source, destination, model) = stores().await;
    let state = tempfile::tempdir().unwrap();
    let migration = open(&source, &destination, state.path(), config(strategy)).await;
    let device: Arc<dyn BlockStore> = migration.device();
    let (stop, clients) = start_clients(device.clone(), &model, load);
    let outcome = tokio::time::timeout(Duration::from_secs(60), migration.run())
        .await
        .expect("migration must finish");
    assert_eq!(outcome.expect("migration"), Phase::Verified, "{strategy}");
    migration.commit().await.expect("commit");
    // Clients keep going a little on the committed volume.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ops = stop_clients(stop, clients).await;
    assert!(ops > 100, "clients did too little ({ops} requests)");
    let progress = migration.progress().await;
    assert_eq!(progress.phase, Phase::Committed);
    assert!(progress.mismatches.is_empty());
    assert_store_matches(&*device, &model, "device after commit").await;
    assert_store_matches(&*destination, &model, "destination store after commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_converges_once_writes_calm_down() {
    let load = Load {
        writes_for: Duration::from_millis(300),
        think: Duration::from_micros(300),
    };
    migrate_under_load(Strategy::Precopy, load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_under_steady_writes() {
    migrate_under_load(Strategy::Mirror, Load::STEADY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aio_under_steady_writes() {
    migrate_under_load(Strategy::Aio, Load::STEADY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slr_under_steady_writes() {
    migrate_under_load(Strategy::Slr, Load::STEADY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_under_steady_writes() {
    migrate_under_load(Strategy::Lr, Load::STEADY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_under_steady_writes() {
    migrate_under_load(Strategy::Redirect, Load::STEADY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_escalates_under_steady_writes() {
    migrate_under_load(Strategy::Auto, Load::STEADY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_gives_up_when_writes_outrun_the_copy() {
    let (source, destination, model) = stores().await;
    let state = tempfile::tempdir().unwrap();
    let mut config = config(Strategy::Precopy);
    config.max_passes = 4;
    let migration = open(&source, &destination, state.path(), config).await;
    let device: Arc<dyn BlockStore> = migration.device();
    let load = Load {
        writes_for: Duration::from_secs(3600),
        think: Duration::from_micros(50),
    };
    let (stop, clients) = start_clients(device.clone(), &model, load);
    let outcome = tokio::time::timeout(Duration::from_secs(60), migration.run())
        .await
        .expect("precopy must stop after a bounded number of passes");
    match outcome.as_ref().map_err(|err| err.kind()) {
        Err(ErrorKind::NotConverging { passes, .. }) => assert!(passes <= 4),
        _ => panic!("expected non-convergence, got {outcome:?}"),
    }
    // Clients were never disturbed, and the source has everything.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop_clients(stop, clients).await;
    assert_store_matches(&*device, &model, "device after failure").await;
    assert_store_matches(&*source, &model, "source after failure").await;
}

async fn rollback_under_load(strategy: Strategy, after: Duration) {
    let (source, destination, model) = stores().await;
    let state = tempfile::tempdir().unwrap();
    let migration = open(&source, &destination, state.path(), config(strategy)).await;
    let device: Arc<dyn BlockStore> = migration.device();
    let (stop, clients) = start_clients(device.clone(), &model, Load::STEADY);
    let running = {
        let migration = migration.clone();
        tokio::spawn(async move { migration.run().await })
    };
    tokio::time::sleep(after).await;
    migration.request_rollback().expect("rollback request");
    let mut outcome = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("rollback must finish")
        .unwrap()
        .expect("run");
    if outcome == Phase::Verified {
        // The copy won the race with the request: roll back from there.
        outcome = migration.run().await.expect("rollback");
    }
    assert_eq!(outcome, Phase::RolledBack, "{strategy}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_clients(stop, clients).await;
    assert_store_matches(&*device, &model, "device after rollback").await;
    assert_store_matches(&*source, &model, "source after rollback").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_mid_copy_every_strategy() {
    // Auto is precopy or mirror at any given moment: covered by those.
    for strategy in Strategy::ALL.into_iter().filter(|&s| s != Strategy::Auto) {
        rollback_under_load(strategy, Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_switchover_copies_back_new_writes() {
    let (source, destination, model) = stores().await;
    let state = tempfile::tempdir().unwrap();
    let mut config = config(Strategy::Mirror);
    config.rate = None;
    let migration = open(&source, &destination, state.path(), config).await;
    let device: Arc<dyn BlockStore> = migration.device();
    assert_eq!(migration.run().await.unwrap(), Phase::Verified);
    // Writes after the switchover land on the destination only.
    let (stop, clients) = start_clients(device.clone(), &model, Load::STEADY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    migration.request_rollback().unwrap();
    assert_eq!(migration.run().await.unwrap(), Phase::RolledBack);
    stop_clients(stop, clients).await;
    assert_store_matches(&*source, &model, "source after rollback").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_is_refused_before_the_copy_is_done() {
    let (source, destination, _) = stores().await;
    let state = tempfile::tempdir().unwrap();
    let migration = open(&source, &destination, state.path(), config(Strategy::Lr)).await;
    let err = migration.commit().await.expect_err("commit before copy");
    assert!(
        err.to_string().contains("does not hold the whole volume"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_copy_resumes_and_keeps_every_durable_write() {
    for strategy in [
        Strategy::Lr,
        Strategy::Redirect,
        Strategy::Auto,
        Strategy::Aio,
    ] {
        let (source, destination, model) = stores().await;
        let state = tempfile::tempdir().unwrap();
        let migration = open(&source, &destination, state.path(), config(strategy)).await;
        let device: Arc<dyn BlockStore> = migration.device();
        let (stop, clients) = start_clients(device.clone(), &model, Load::STEADY);
        let running = {
            let migration = migration.clone();
            tokio::spawn(async move { migration.run().await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        // "kill -9": the migration stops mid-flight, nothing is shut down.
        running.abort();
        let _ = running.await;
        stop_clients(stop, clients).await;
        let before = migration.progress().await.copied_bytes;
        drop(device);
        drop(migration);
        tokio::time::sleep(Duration::from_millis(50)).await;

        let migration = open(&source, &destination, state.path(), config(strategy)).await;
        let resumed = migration.progress().await.copied_bytes;
        assert!(
            resumed > 0 && resumed <= before,
            "{strategy}: resumes from its checkpoint"
        );
        let device: Arc<dyn BlockStore> = migration.device();
        let what = format!("{strategy}: device after restart");
        assert_store_survived(&*device, &model, &what).await;
        let (stop, clients) = start_clients(device.clone(), &model, Load::STEADY);
        let outcome = tokio::time::timeout(Duration::from_secs(60), migration.run()).await;
        assert_eq!(
            outcome.expect("finishes").expect("resumed run"),
            Phase::Verified
        );
        migration.commit().await.unwrap();
        stop_clients(stop, clients).await;
        assert_store_matches(&*destination, &model, "destination after resume").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_switchover_waits_for_the_admin() {
    for strategy in [Strategy::Lr, Strategy::Precopy] {
        let (source, destination, model) = stores().await;
        let state = tempfile::tempdir().unwrap();
        let mut config = config(strategy);
        config.rate = None;
        let migration = open(&source, &destination, state.path(), config).await;
        migration.controls().hold_switchover();
        let device: Arc<dyn BlockStore> = migration.device();
        let load = Load {
            writes_for: Duration::from_millis(200),
            think: Duration::from_micros(300),
        };
        let (stop, clients) = start_clients(device.clone(), &model, load);
        let running = {
            let migration = migration.clone();
            tokio::spawn(async move { migration.run().await })
        };
        let waiting = async {
            loop {
                let progress = migration.progress().await;
                if progress.activity == dmm_volume::Activity::WaitingForSwitchover {
                    return progress;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let progress = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the copy finishes and waits");
        assert_eq!(
            progress.phase,
            Phase::Copying,
            "{strategy}: no switchover yet"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!running.is_finished(), "{strategy}: still waiting");
        migration.controls().allow_switchover();
        let outcome = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("switches once allowed")
            .unwrap();
        assert_eq!(outcome.unwrap(), Phase::Verified, "{strategy}");
        stop_clients(stop, clients).await;
        migration.commit().await.unwrap();
        assert_store_matches(&*destination, &model, "destination").await;
    }
}
