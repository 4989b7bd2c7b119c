//! Stress of the tree access point: client threads do random namespace and
//! data operations (create, write, truncate, read, rename across
//! directories, unlink, link, chmod, readdir, mkdir, rmdir) through the
//! access point of a migration whose workers copy at full speed, while
//! `dmm stat` is polled. A watchdog fails the test if any operation takes
//! longer than [`STUCK`] (and kills the daemon, so that nothing stays
//! blocked). Each client keeps a model of what it did; after the commit the
//! target must be exactly the union of the models, and what no client
//! touched must equal the source.
//!
//! Clients share the source's directories but each owns its names (a share
//! of the source's files and everything it creates, prefixed `c<N>-`), so
//! every model is exact although the clients run at once.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, scratch, tool};

const CLIENTS: usize = 4;
/// How long the clients work.
const RUN_FOR: Duration = Duration::from_secs(20);
/// An operation that takes longer fails the test.
const STUCK: Duration = Duration::from_secs(10);
/// Source directories the clients share, and files in each.
const SHARED: usize = 6;
const FILES: usize = 48;
/// A bulk of directories and files no client touches, which keeps the
/// workers busy while the clients work.
const BULK_DIRS: usize = 60;
const BULK_FILES: usize = 500;

/// xorshift64*: reproducible random choices from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let seed = self.next();
        (0..len)
            .map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ (i as u8))
            .collect()
    }
}

fn source_content(dir: usize, file: usize) -> Vec<u8> {
    // Every eighth file is large: segments still pending while clients
    // work on it.
    let len = if file.is_multiple_of(8) {
        3 << 20
    } else {
        1000 + 997 * file
    };
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(13)
                .wrapping_add((dir * FILES + file) as u8)
        })
        .collect()
}

fn owner_of(dir: usize, file: usize) -> usize {
    (dir * FILES + file) % CLIENTS
}

/// A source tree: the shared directories, and a bulk the workers copy
/// while the clients work.
fn build_source(root: &Path) {
    for dir in 0..SHARED {
        let path = root.join(format!("s{dir}"));
        fs::create_dir(&path).unwrap();
        for file in 0..FILES {
            fs::write(path.join(format!("f{file:02}")), source_content(dir, file)).unwrap();
        }
    }
    for dir in 0..BULK_DIRS {
        let path = root.join(format!("bulk/b{dir:02}"));
        fs::create_dir_all(&path).unwrap();
        for file in 0..BULK_FILES {
            fs::write(
                path.join(format!("x{file}")),
                vec![dir as u8; 500 + file * 40],
            )
            .unwrap();
        }
        fs::write(path.join("large"), vec![dir as u8 ^ 0x5a; 8 << 20]).unwrap();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

#[derive(Clone)]
struct FileModel {
    content: Vec<u8>,
    mode: u32,
}

/// What one client expects: its paths (relative to the root) and its
/// files' contents and modes (hard links share a file).
#[derive(Default)]
struct Model {
    paths: BTreeMap<PathBuf, Node>,
    files: HashMap<u64, FileModel>,
    next: u64,
}

impl Model {
    fn new_file(&mut self, path: PathBuf, content: Vec<u8>, mode: u32) {
        self.next += 1;
        self.files.insert(self.next, FileModel { content, mode });
        self.paths.insert(path, Node::File(self.next));
    }

    fn pick(&self, rng: &mut Rng, kind: fn(&Node) -> bool) -> Option<(PathBuf, Node)> {
        let matching: Vec<_> = self.paths.iter().filter(|(_, n)| kind(n)).collect();
        if matching.is_empty() {
            return None;
        }
        let (path, node) = matching[rng.below(matching.len())];
        Some((path.clone(), *node))
    }

    fn file(&mut self, path: &Path) -> &mut FileModel {
        let Some(Node::File(id)) = self.paths.get(path) else {
            panic!("{} is not a file of the model", path.display())
        };
        self.files.get_mut(id).unwrap()
    }

    /// Moves `from` (and everything under it) to `to`.
    fn rename(&mut self, from: &Path, to: &Path) {
        let moved: Vec<_> = self
            .paths
            .keys()
            .filter(|p| p.starts_with(from))
            .cloned()
            .collect();
        for path in moved {
            let node = self.paths.remove(&path).unwrap();
            let rest = path.strip_prefix(from).unwrap();
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.paths.insert(new, node);
        }
    }

    /// Names of this model's entries directly in `dir`.
    fn names_in(&self, dir: &Path) -> BTreeSet<String> {
        self.paths
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
}

/// What each client and the poller are doing, for the watchdog.
type Slots = Arc<Mutex<Vec<Option<(String, Instant)>>>>;

struct Client {
    id: usize,
    access: PathBuf,
    rng: Rng,
    model: Model,
    slots: Slots,
    counter: u64,
    /// The longest operation so far.
    slowest: (Duration, &'static str),
}

impl Client {
    fn new(id: usize, access: &Path, slots: Slots) -> Client {
        let mut model = Model::default();
        for dir in 0..SHARED {
            for file in (0..FILES).filter(|&f| owner_of(dir, f) == id) {
                let path = PathBuf::from(format!("s{dir}/f{file:02}"));
                model.new_file(path, source_content(dir, file), 0o644);
            }
        }
        Client {
            id,
            access: access.to_path_buf(),
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x1234_5678_9abc)),
            model,
            slots,
            counter: 0,
            slowest: (Duration::ZERO, ""),
        }
    }

    fn at(&self, relative: &Path) -> PathBuf {
        self.access.join(relative)
    }

    fn fresh_name(&mut self, what: &str) -> String {
        self.counter += 1;
        format!("c{}-{what}{}", self.id, self.counter)
    }

    /// A directory to put something in: a shared one or one of its own.
    fn some_dir(&mut self) -> PathBuf {
        if self.rng.below(3) == 0
            && let Some((dir, _)) = self.model.pick(&mut self.rng, |n| *n == Node::Dir)
        {
            return dir;
        }
        PathBuf::from(format!("s{}", self.rng.below(SHARED)))
    }

    /// Runs `op` named `name` under the watchdog's eye.
    fn timed<T>(&mut self, name: &'static str, op: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        self.slots.lock().unwrap()[self.id] = Some((name.to_owned(), started));
        let result = op();
        self.slots.lock().unwrap()[self.id] = None;
        self.slowest = self.slowest.max((started.elapsed(), name));
        result
    }

    /// Runs `op` on `paths` (relative) through the access point, timed;
    /// any error fails the test.
    fn act<const N: usize, T>(
        &mut self,
        name: &'static str,
        paths: [&Path; N],
        op: impl FnOnce([PathBuf; N]) -> io::Result<T>,
    ) -> T {
        let through = paths.map(|p| self.at(p));
        self.timed(name, || op(through))
            .unwrap_or_else(|e| panic!("client {}: {name} {paths:?}: {e}", self.id))
    }

    /// One of the client's files, if it has any.
    fn some_file(&mut self) -> Option<PathBuf> {
        let picked = self
            .model
            .pick(&mut self.rng, |n| matches!(n, Node::File(_)));
        picked.map(|(path, _)| path)
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..20 => self.create(),
            20..40 => self.write(),
            40..48 => self.truncate(),
            48..63 => self.read(),
            63..73 => self.rename_file(),
            73..78 => self.unlink(),
            78..83 => self.link(),
            83..88 => self.chmod(),
            88..95 => self.readdir(),
            95..97 => self.mkdir(),
            97..99 => self.rename_dir(),
            _ => self.rmdir(),
        }
    }

    fn create(&mut self) {
        let path = self.some_dir().join(self.fresh_name("n"));
        let len = self.rng.below(200_000);
        let content = self.rng.bytes(len);
        self.act("create", [&path], |[at]| fs::write(at, &content));
        self.model.new_file(path, content, 0o644);
    }

    fn write(&mut self) {
        let Some(path) = self.some_file() else { return };
        let len = self.model.file(&path).content.len();
        let offset = self.rng.below(len + 32_768);
        let data_len = 1 + self.rng.below(65_536);
        let data = self.rng.bytes(data_len);
        self.act("write", [&path], |[at]| {
            let file = fs::OpenOptions::new().write(true).open(at)?;
            file.write_all_at(&data, offset as u64)
        });
        let content = &mut self.model.file(&path).content;
        if content.len() < offset + data.len() {
            content.resize(offset + data.len(), 0);
        }
        content[offset..offset + data.len()].copy_from_slice(&data);
    }

    fn truncate(&mut self) {
        let Some(path) = self.some_file() else { return };
        let len = self.model.file(&path).content.len();
        let size = self.rng.below(len * 3 / 2 + 2);
        self.act("truncate", [&path], |[at]| {
            fs::OpenOptions::new()
                .write(true)
                .open(at)?
                .set_len(size as u64)
        });
        self.model.file(&path).content.resize(size, 0);
    }

    fn read(&mut self) {
        let Some(path) = self.some_file() else { return };
        let data = self.act("read", [&path], |[at]| fs::read(at));
        let expected = &self.model.file(&path).content;
        assert!(
            &data == expected,
            "client {}: {} reads {} bytes, the model has {}",
            self.id,
            path.display(),
            data.len(),
            expected.len()
        );
    }

    fn rename_file(&mut self) {
        let Some(path) = self.some_file() else { return };
        let to = self.some_dir().join(self.fresh_name("r"));
        self.act("rename", [&path, &to], |[from, to]| fs::rename(from, to));
        self.model.rename(&path, &to);
    }

    fn unlink(&mut self) {
        let Some(path) = self.some_file() else { return };
        self.act("unlink", [&path], |[at]| fs::remove_file(at));
        self.model.paths.remove(&path);
    }

    fn link(&mut self) {
        let Some(path) = self.some_file() else { return };
        let to = self.some_dir().join(self.fresh_name("l"));
        self.act("link", [&path, &to], |[from, to]| fs::hard_link(from, to));
        let node = self.model.paths[&path];
        self.model.paths.insert(to, node);
    }

    fn chmod(&mut self) {
        let Some(path) = self.some_file() else { return };
        let mode = [0o600, 0o640, 0o644, 0o664, 0o755][self.rng.below(5)];
        self.act("chmod", [&path], |[at]| {
            fs::set_permissions(at, fs::Permissions::from_mode(mode))
        });
        self.model.file(&path).mode = mode;
    }

    fn readdir(&mut self) {
        let dir = self.some_dir();
        let listed = self.act("readdir", [&dir], |[at]| {
            fs::read_dir(at)?.collect::<Result<Vec<_>, _>>()
        });
        let expected = self.model.names_in(&dir);
        let prefix = format!("c{}-", self.id);
        let mine: BTreeSet<String> = listed
            .iter()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| expected.contains(name) || name.starts_with(&prefix))
            .collect();
        assert_eq!(
            mine,
            expected,
            "client {}: listing of {}",
            self.id,
            dir.display()
        );
    }

    fn mkdir(&mut self) {
        let path = PathBuf::from(format!("s{}", self.rng.below(SHARED))).join(self.fresh_name("d"));
        self.act("mkdir", [&path], |[at]| fs::create_dir(at));
        self.model.paths.insert(path, Node::Dir);
    }

    fn rename_dir(&mut self) {
        let Some((path, _)) = self.model.pick(&mut self.rng, |n| *n == Node::Dir) else {
            return;
        };
        let to = PathBuf::from(format!("s{}", self.rng.below(SHARED))).join(self.fresh_name("m"));
        self.act("rename a directory", [&path, &to], |[from, to]| {
            fs::rename(from, to)
        });
        self.model.rename(&path, &to);
    }

    fn rmdir(&mut self) {
        let empty: Vec<PathBuf> = self
            .model
            .paths
            .iter()
            .filter(|(p, n)| **n == Node::Dir && self.model.names_in(p).is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        if empty.is_empty() {
            return;
        }
        let path = empty[self.rng.below(empty.len())].clone();
        self.act("rmdir", [&path], |[at]| fs::remove_dir(at));
        self.model.paths.remove(&path);
    }
}

/// Fails the test (and kills the daemon, so blocked calls return) if an
/// operation in `slots` runs longer than [`STUCK`].
fn watchdog(
    slots: Slots,
    done: Arc<AtomicBool>,
    daemon_pid: u32,
) -> thread::JoinHandle<Option<String>> {
    thread::spawn(move || {
        while !done.load(Ordering::Acquire) {
            let stuck = slots
                .lock()
                .unwrap()
                .iter()
                .enumerate()
                .find_map(|(who, slot)| {
                    let (what, since) = slot.as_ref()?;
                    (since.elapsed() > STUCK)
                        .then(|| format!("{what} of client {who} took over {STUCK:?}"))
                });
            if let Some(stuck) = stuck {
                let pid = rustix::process::Pid::from_raw(daemon_pid as i32).unwrap();
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                done.store(true, Ordering::Release);
                return Some(stuck);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    })
}

#[test]
fn clients_hammering_the_access_point_never_wait_long_and_get_exactly_what_they_did() {
    let dir = scratch();
    let at = |name: &str| dir.path().join(name);
    for name in ["source", "target", "access"] {
        fs::create_dir(at(name)).unwrap();
    }
    build_source(&at("source"));
    let slots: Slots = Arc::new(Mutex::new(vec![None; CLIENTS + 1]));
    let ready: Vec<Client> = (0..CLIENTS)
        .map(|id| Client::new(id, &at("access"), slots.clone()))
        .collect();
    let daemon = Daemon::start(&at("state"), &[]);
    let created = daemon.ok(&[
        "create",
        "-p",
        "kind=tree",
        "-p",
        &format!("source={}", at("source").display()),
        "-p",
        &format!("target={}", at("target").display()),
        "-p",
        &format!("access={}", at("access").display()),
        "-p",
        "segsize=256K",
    ]);
    let migid = created.split_whitespace().last().unwrap().to_owned();

    let done = Arc::new(AtomicBool::new(false));
    let watchdog = watchdog(slots.clone(), done.clone(), daemon.pid());
    let started = Instant::now();
    let clients: Vec<_> = ready
        .into_iter()
        .map(|mut client| {
            let done = done.clone();
            thread::spawn(move || {
                let mut steps = 0;
                while !done.load(Ordering::Acquire) && started.elapsed() < RUN_FOR {
                    client.step();
                    steps += 1;
                }
                (client.model, steps, client.slowest)
            })
        })
        .collect();
    let mut polls = 0;
    let mut progressed = Vec::new();
    let mut stat_times = Vec::new();
    while !done.load(Ordering::Acquire) && started.elapsed() < RUN_FOR {
        let asked = Instant::now();
        slots.lock().unwrap()[CLIENTS] = Some(("dmm stat".into(), asked));
        let stat = daemon.json(&["stat", &migid]);
        slots.lock().unwrap()[CLIENTS] = None;
        stat_times.push(asked.elapsed());
        let files = |key: &str| stat["progress"][key].as_u64().unwrap();
        progressed.push((
            files("files_done"),
            files("files_total"),
            started.elapsed().as_millis(),
        ));
        polls += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let models: Vec<(Model, usize, (Duration, &str))> = clients
        .into_iter()
        .map(|c| c.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect();
    done.store(true, Ordering::Release);
    if let Some(stuck) = watchdog.join().unwrap() {
        panic!("{stuck}");
    }
    let steps: Vec<usize> = models.iter().map(|(_, steps, _)| *steps).collect();
    let slowest = models.iter().map(|(_, _, slowest)| *slowest).max().unwrap();
    stat_times.sort();
    eprintln!(
        "client steps {steps:?}, slowest {slowest:?}, {polls} stat polls (median {:?}, \
         slowest {:?}), (files done, of total, at ms) {progressed:?}",
        stat_times[stat_times.len() / 2],
        stat_times.last().unwrap()
    );
    // The workers made progress while the clients worked: polls saw files
    // still to copy, and more of them copied from one to the next.
    let copying: Vec<u64> = progressed
        .iter()
        .filter(|(done, total, _)| done < total)
        .map(|(done, _, _)| *done)
        .collect();
    assert!(
        copying.len() >= 3 && copying.last().unwrap() - copying[0] >= 1000,
        "the workers did not copy while the clients worked"
    );

    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(300));
    daemon.ok(&["commit", &migid]);
    assert!(daemon.stop().success());
    let models: Vec<Model> = models.into_iter().map(|(m, _, _)| m).collect();
    check_target(&at("target"), &models);
    let bulk = tool("rsync")
        .args(["-aHAXn", "--checksum", "-i", "--delete"])
        .arg(format!("{}/", at("source/bulk").display()))
        .arg(format!("{}/", at("target/bulk").display()))
        .output()
        .unwrap();
    assert!(bulk.status.success());
    assert_eq!(String::from_utf8_lossy(&bulk.stdout), "", "bulk differs");
}

/// The target holds exactly the union of the models: every path with its
/// content and mode, hard links as one inode, nothing else in the
/// directories the clients used.
fn check_target(target: &Path, models: &[Model]) {
    let mut dirs: BTreeSet<PathBuf> = (0..SHARED)
        .map(|d| PathBuf::from(format!("s{d}")))
        .collect();
    let mut expected_names: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for model in models {
        let mut inodes: HashMap<u64, u64> = HashMap::new();
        for (path, node) in &model.paths {
            let meta = fs::symlink_metadata(target.join(path))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            expected_names
                .entry(path.parent().unwrap().to_path_buf())
                .or_default()
                .insert(path.file_name().unwrap().to_string_lossy().into_owned());
            match node {
                Node::Dir => {
                    assert!(meta.is_dir(), "{} is not a directory", path.display());
                    dirs.insert(path.clone());
                }
                Node::File(id) => {
                    let file = &model.files[id];
                    let content = fs::read(target.join(path)).unwrap();
                    assert!(
                        content == file.content,
                        "{} differs from the model",
                        path.display()
                    );
                    assert_eq!(meta.mode() & 0o7777, file.mode, "{} mode", path.display());
                    let ino = *inodes.entry(*id).or_insert(meta.ino());
                    assert_eq!(
                        meta.ino(),
                        ino,
                        "{}: hard links are one inode",
                        path.display()
                    );
                }
            }
        }
    }
    for dir in dirs {
        let found: BTreeSet<String> = fs::read_dir(target.join(&dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let expected = expected_names.remove(&dir).unwrap_or_default();
        assert_eq!(found, expected, "entries of {}", dir.display());
    }
}
