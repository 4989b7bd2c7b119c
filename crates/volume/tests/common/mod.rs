//! A harness for migration tests: memory stores, a migration over them, and
//! client tasks that hammer the virtual device while keeping a model of
//! what every byte must read as.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmm_store::{BlockStore, Bytes, MemoryStore, ZeroMode};
use dmm_volume::{Migration, MigrationConfig, Priority, Strategy, Verify};
use parking_lot::Mutex;
use tokio::sync::watch;

pub const SIZE: u64 = 8 << 20;
pub const CHUNK: u64 = 64 << 10;
const SLOT: u64 = 24 << 10;
pub const CLIENTS: u64 = 4;

/// What each byte of the volume must read as; `None` after a discard.
pub type Model = Arc<Mutex<Vec<Option<u8>>>>;

/// A tiny deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Memory source (half of it written) and destination, and the model.
pub async fn stores() -> (Arc<MemoryStore>, Arc<MemoryStore>, Model) {
    let source = Arc::new(MemoryStore::new(SIZE));
    let destination = Arc::new(MemoryStore::new(SIZE));
    let mut model = vec![Some(0u8); SIZE as usize];
    let mut rng = Rng(0x1234_5678);
    for chunk in (0..SIZE / CHUNK).filter(|c| c % 2 == 0) {
        let offset = chunk * CHUNK + rng.below(CHUNK / 2);
        let len = 1 + rng.below(CHUNK / 2) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
        for (i, &b) in data.iter().enumerate() {
            model[offset as usize + i] = Some(b);
        }
        source
            .write(offset, Bytes::from(data), false)
            .await
            .unwrap();
    }
    (source, destination, Arc::new(Mutex::new(model)))
}

pub fn config(strategy: Strategy) -> MigrationConfig {
    MigrationConfig {
        strategy,
        chunk_size: CHUNK,
        rate: Some(6 << 20),
        in_flight: 4,
        priority: Priority::Normal,
        verify: Verify::Full,
        checkpoint_every: Duration::from_millis(100),
        max_passes: 12,
    }
}

pub async fn open(
    source: &Arc<MemoryStore>,
    destination: &Arc<MemoryStore>,
    state: &std::path::Path,
    config: MigrationConfig,
) -> Arc<Migration> {
    let names = ("memory:source".to_owned(), "memory:destination".to_owned());
    let migration = Migration::open(source.clone(), destination.clone(), names, state, config)
        .await
        .expect("open migration");
    Arc::new(migration)
}

/// How clients behave.
#[derive(Clone, Copy)]
pub struct Load {
    /// Clients write only during this long, then only read.
    pub writes_for: Duration,
    /// Pause between a client's requests.
    pub think: Duration,
}

impl Load {
    pub const STEADY: Load = Load {
        writes_for: Duration::from_secs(3600),
        think: Duration::from_micros(300),
    };
}

/// Checks `got` (read at `offset`) against the model.
pub fn check(model: &[Option<u8>], offset: u64, got: &[u8], what: &str) {
    for (i, &byte) in got.iter().enumerate() {
        if let Some(expected) = model[offset as usize + i]
            && expected != byte
        {
            panic!(
                "{what}: byte at {} is {byte:#x}, expected {expected:#x}",
                offset as usize + i
            );
        }
    }
}

/// One client: owns the slots `k` with `k % CLIENTS == id`, so its view is
/// sequential; runs until `stop`.
pub async fn client(
    id: u64,
    device: Arc<dyn BlockStore>,
    model: Model,
    load: Load,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut rng = Rng(0x9e37_79b9 + id);
    let slots: Vec<u64> = (0..SIZE / SLOT).filter(|k| k % CLIENTS == id).collect();
    let started = Instant::now();
    let mut ops = 0;
    while !*stop.borrow_and_update() {
        let slot = slots[rng.below(slots.len() as u64) as usize];
        let start = slot * SLOT + rng.below(SLOT / 2);
        let len = 1 + rng.below(slot * SLOT + SLOT - start);
        let writing = started.elapsed() < load.writes_for;
        match rng.below(12) {
            0..=4 if writing => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let fua = rng.below(4) == 0;
                device
                    .write(start, Bytes::from(data.clone()), fua)
                    .await
                    .expect("write");
                let mut model = model.lock();
                for (i, b) in data.into_iter().enumerate() {
                    model[start as usize + i] = Some(b);
                }
            }
            5 if writing => {
                let mode = ZeroMode {
                    may_punch: rng.below(2) == 0,
                    fast_only: false,
                };
                device
                    .write_zeroes(start, len, mode, false)
                    .await
                    .expect("write zeroes");
                model.lock()[start as usize..(start + len) as usize].fill(Some(0));
            }
            6 if writing => {
                device.discard(start, len, false).await.expect("discard");
                model.lock()[start as usize..(start + len) as usize].fill(None);
            }
            7 => device.flush().await.expect("flush"),
            _ => {
                let got = device.read(start, len as usize).await.expect("read");
                check(&model.lock(), start, &got, "client read");
            }
        }
        ops += 1;
        tokio::time::sleep(load.think).await;
    }
    ops
}

/// Starts the clients; returns the stop switch and their handles.
pub fn start_clients(
    device: Arc<dyn BlockStore>,
    model: &Model,
    load: Load,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<u64>>) {
    let (stop, stopped) = watch::channel(false);
    let clients = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                device.clone(),
                model.clone(),
                load,
                stopped.clone(),
            ))
        })
        .collect();
    (stop, clients)
}

pub async fn stop_clients(
    stop: watch::Sender<bool>,
    clients: Vec<tokio::task::JoinHandle<u64>>,
) -> u64 {
    stop.send_replace(true);
    let mut ops = 0;
    for client in clients {
        ops += client.await.expect("client task panicked");
    }
    ops
}

/// The whole store equals the model where the model knows the bytes.
pub async fn assert_store_matches(store: &dyn BlockStore, model: &Model, what: &str) {
    let data = store.read(0, SIZE as usize).await.unwrap();
    check(&model.lock(), 0, &data, what);
}
