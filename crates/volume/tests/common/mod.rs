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

/// What each byte of the volume must read as, and what it may read as
/// after a crash.
pub type Model = Arc<Mutex<Expected>>;

/// One change issued (and maybe acknowledged) that no flush has covered.
#[derive(Clone)]
struct Unflushed {
    number: u64,
    offset: usize,
    /// The bytes it leaves; `None` after a discard.
    bytes: Vec<Option<u8>>,
    acknowledged: bool,
    fua: bool,
}

/// The crash contract as data: the device is a disk with a volatile write
/// cache. While it runs, every read returns the latest acknowledged bytes.
/// After a crash, each byte holds its last durable value (made so by an
/// acknowledged FUA write or a completed flush) or the value of any later
/// write of it, which the crash may or may not have kept.
///
/// A change is recorded when it is issued and again when it is
/// acknowledged, so that a power cut taken between the two (by a harness
/// that snapshots this model at the cut) still allows its bytes.
#[derive(Clone)]
pub struct Expected {
    latest: Vec<Option<u8>>,
    durable: Vec<Option<u8>>,
    unflushed: Vec<Unflushed>,
    next_change: u64,
}

impl Expected {
    pub fn new(bytes: Vec<Option<u8>>) -> Expected {
        Expected {
            durable: bytes.clone(),
            latest: bytes,
            unflushed: Vec::new(),
            next_change: 0,
        }
    }

    /// The latest acknowledged bytes.
    pub fn latest(&self) -> &[Option<u8>] {
        &self.latest
    }

    /// Records a change about to be issued; returns its number.
    pub fn issue(&mut self, offset: u64, bytes: Vec<Option<u8>>, fua: bool) -> u64 {
        let number = self.next_change;
        self.next_change += 1;
        self.unflushed.push(Unflushed {
            number,
            offset: offset as usize,
            bytes,
            acknowledged: false,
            fua,
        });
        number
    }

    /// Change `number` was acknowledged.
    pub fn acknowledge(&mut self, number: u64) {
        let Some(change) = self.unflushed.iter_mut().find(|c| c.number == number) else {
            return;
        };
        change.acknowledged = true;
        let range = change.offset..change.offset + change.bytes.len();
        self.latest[range.clone()].copy_from_slice(&change.bytes);
        if change.fua {
            self.durable[range].copy_from_slice(&change.bytes);
        }
    }

    /// What a flush issued now covers: the changes acknowledged so far.
    pub fn flush_mark(&self) -> Vec<u64> {
        let acknowledged = self.unflushed.iter().filter(|c| c.acknowledged);
        acknowledged.map(|c| c.number).collect()
    }

    /// A flush issued at `mark` completed: the changes it covers are
    /// durable, in order (and a later FUA write stays on top of them).
    pub fn flushed(&mut self, mark: &[u64]) {
        let (settled, rest): (Vec<Unflushed>, Vec<Unflushed>) = std::mem::take(&mut self.unflushed)
            .into_iter()
            .partition(|c| mark.contains(&c.number));
        self.unflushed = rest;
        let later_fua = self.unflushed.iter().filter(|c| c.fua && c.acknowledged);
        for change in settled.iter().chain(later_fua) {
            let range = change.offset..change.offset + change.bytes.len();
            self.durable[range].copy_from_slice(&change.bytes);
        }
    }

    /// Checks a whole volume read back after a crash against the contract,
    /// then takes it as the truth the resumed run starts from.
    pub fn crashed(&mut self, got: &[u8], what: &str) {
        if let Some(at) = self.first_violation(got) {
            panic!("{what}: {}", self.explain(at, got[at]));
        }
        self.latest = got.iter().map(|&b| Some(b)).collect();
        self.durable = self.latest.clone();
        self.unflushed.clear();
    }

    /// The first byte of `got` the contract does not allow.
    pub fn first_violation(&self, got: &[u8]) -> Option<usize> {
        got.iter().enumerate().position(|(at, &byte)| {
            let durable = self.durable[at].is_none_or(|expected| expected == byte);
            let later = || {
                self.unflushed.iter().any(|change| {
                    at.checked_sub(change.offset)
                        .and_then(|i| change.bytes.get(i))
                        .is_some_and(|value| value.is_none_or(|value| value == byte))
                })
            };
            !(durable || later())
        })
    }

    /// Why `byte` at `at` breaks the contract.
    pub fn explain(&self, at: usize, byte: u8) -> String {
        format!(
            "byte at {at} is {byte:#x}, but its last durable value is {:#x?} and no later write \
             left {byte:#x}",
            self.durable[at]
        )
    }
}

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
    let model = fill_half(&*source, CHUNK).await;
    (source, destination, model)
}

/// Writes data into every other chunk of `store` (a part of each, at a
/// random place); returns the model of what it holds.
pub async fn fill_half(store: &dyn BlockStore, chunk_size: u64) -> Model {
    let size = store.size();
    let mut model = vec![Some(0u8); size as usize];
    let mut rng = Rng(0x1234_5678);
    for chunk in (0..size / chunk_size).filter(|c| c % 2 == 0) {
        let offset = chunk * chunk_size + rng.below(chunk_size / 2);
        let len = 1 + rng.below(chunk_size / 2) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
        for (i, &b) in data.iter().enumerate() {
            model[offset as usize + i] = Some(b);
        }
        store.write(offset, Bytes::from(data), false).await.unwrap();
    }
    store.flush().await.unwrap();
    Arc::new(Mutex::new(Expected::new(model)))
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
    let size = device.size();
    let slots: Vec<u64> = (0..size / SLOT).filter(|k| k % CLIENTS == id).collect();
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
                let bytes = data.iter().copied().map(Some).collect();
                let number = model.lock().issue(start, bytes, fua);
                device
                    .write(start, Bytes::from(data), fua)
                    .await
                    .expect("write");
                model.lock().acknowledge(number);
            }
            5 if writing => {
                let mode = ZeroMode {
                    may_punch: rng.below(2) == 0,
                    fast_only: false,
                };
                let number = model
                    .lock()
                    .issue(start, vec![Some(0); len as usize], false);
                device
                    .write_zeroes(start, len, mode, false)
                    .await
                    .expect("write zeroes");
                model.lock().acknowledge(number);
            }
            6 if writing => {
                let number = model.lock().issue(start, vec![None; len as usize], false);
                device.discard(start, len, false).await.expect("discard");
                model.lock().acknowledge(number);
            }
            7 => {
                let mark = model.lock().flush_mark();
                device.flush().await.expect("flush");
                model.lock().flushed(&mark);
            }
            _ => {
                let got = device.read(start, len as usize).await.expect("read");
                check(model.lock().latest(), start, &got, "client read");
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
    let data = store.read(0, store.size() as usize).await.unwrap();
    check(model.lock().latest(), 0, &data, what);
}

/// The whole store, read back after a crash, keeps the crash contract; the
/// model then takes what it holds as the truth.
pub async fn assert_store_survived(store: &dyn BlockStore, model: &Model, what: &str) {
    let data = store.read(0, store.size() as usize).await.unwrap();
    model.lock().crashed(&data, what);
}
