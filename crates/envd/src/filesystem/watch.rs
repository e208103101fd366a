//! Directory watches with inotify, for the `WatchDir` stream and for polled watchers.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hearth_envd_proto::filesystem::{EventType, FilesystemEvent};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::entry::entry_info;
use crate::users::NameTable;

/// Events a polled watcher keeps between two `GetWatcherEvents` calls; older ones are
/// dropped first.
const MAX_BUFFERED_EVENTS: usize = 10_000;

/// Events a `WatchDir` stream buffers before the watch task waits for the client.
pub const STREAM_CHANNEL_EVENTS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("path {0} not found")]
    NotFound(PathBuf),
    #[error("path {0} is not a directory")]
    NotDirectory(PathBuf),
    #[error("path {path} is on a network filesystem (type {fs_type:#x}); set allow_network_mounts to watch it")]
    NetworkMount { path: PathBuf, fs_type: i64 },
    #[error("failed to watch {path}")]
    Inotify {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to register inotify with the reactor")]
    Register(#[source] std::io::Error),
}

/// Directory and options of a watch.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub root: PathBuf,
    pub recursive: bool,
    pub include_entry: bool,
    pub allow_network_mounts: bool,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify instance with one watch per watched directory.
pub struct DirWatch {
    inotify: AsyncFd<InotifyFd>,
    directories: HashMap<WatchDescriptor, PathBuf>,
    options: WatchOptions,
    names: NameTable,
}

const WATCH_FLAGS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

/// Filesystem magic numbers (`statfs.f_type`) of network and FUSE filesystems, from
/// Linux's `include/uapi/linux/magic.h` and the CIFS/SMB2/FUSE sources.
const NETWORK_FS_TYPES: [i64; 5] = [0x6969, 0x517B, 0xFF53_4D42, 0xFE53_4D42, 0x6573_5546];

fn filesystem_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and `stat` is valid for one `statfs` write.
    let result = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if result != 0 {
        return None;
    }
    // SAFETY: statfs returned 0, so it initialized `stat`.
    Some(unsafe { stat.assume_init() }.f_type as i64)
}

impl DirWatch {
    /// Starts watching `options.root`, and with `recursive` every directory below it.
    pub fn new(options: WatchOptions) -> Result<Self, WatchError> {
        let root = options.root.clone();
        match std::fs::metadata(&root) {
            Err(_) => return Err(WatchError::NotFound(root)),
            Ok(metadata) if !metadata.is_dir() => return Err(WatchError::NotDirectory(root)),
            Ok(_) => {}
        }
        if !options.allow_network_mounts {
            if let Some(fs_type) = filesystem_type(&root).filter(|fs_type| NETWORK_FS_TYPES.contains(fs_type)) {
                return Err(WatchError::NetworkMount { path: root, fs_type });
            }
        }

        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|source| WatchError::Inotify { path: root.clone(), source })?;
        let mut watch = Self {
            // SAFETY: the inotify descriptor is owned by `InotifyFd`, which the AsyncFd owns
            // until it is dropped, and `as_raw_fd` always returns that descriptor.
            inotify: unsafe { AsyncFd::register(InotifyFd(inotify)) }
                .map_err(|err| WatchError::Register(err.into()))?,
            directories: HashMap::new(),
            options,
            names: NameTable::load(),
        };
        watch.add_directory(&root)?;
        if watch.options.recursive {
            watch.add_subdirectories(&root);
        }
        Ok(watch)
    }

    fn add_directory(&mut self, dir: &Path) -> Result<(), WatchError> {
        let descriptor = self
            .inotify
            .get_ref()
            .0
            .add_watch(dir, WATCH_FLAGS)
            .map_err(|source| WatchError::Inotify { path: dir.to_path_buf(), source })?;
        self.directories.insert(descriptor, dir.to_path_buf());
        Ok(())
    }

    fn add_subdirectories(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false);
            if is_dir {
                let path = entry.path();
                if let Err(err) = self.add_directory(&path) {
                    tracing::debug!(path = %path.display(), %err, "failed to watch subdirectory");
                    continue;
                }
                self.add_subdirectories(&path);
            }
        }
    }

    /// Waits for the next batch of events.
    pub async fn next_events(&mut self) -> std::io::Result<Vec<FilesystemEvent>> {
        loop {
            let mut guard = self.inotify.readable().await?;
            let read = guard.try_io(|inner| inner.get_ref().0.read_events().map_err(std::io::Error::from));
            let raw_events = match read {
                Ok(Ok(events)) => events,
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            };
            let mut events = Vec::new();
            for raw in raw_events {
                let Some(dir) = self.directories.get(&raw.wd).cloned() else {
                    continue;
                };
                let path = match &raw.name {
                    Some(name) => dir.join(name),
                    None => dir.clone(),
                };
                if raw.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.directories.remove(&raw.wd);
                    continue;
                }
                let is_dir = raw.mask.contains(AddWatchFlags::IN_ISDIR);
                let created = raw.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
                let watch_new_directory = self.options.recursive && is_dir && created && raw.name.is_some();
                if watch_new_directory && self.add_directory(&path).is_ok() {
                    self.add_subdirectories(&path);
                }
                // Events of the watched directory itself are reported by its parent's
                // watch in a recursive tree; the root's own removal is reported here.
                if raw.name.is_none() && dir != self.options.root {
                    continue;
                }
                if let Some(event) = self.convert(raw.mask, &path) {
                    events.push(event);
                }
            }
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    fn convert(&self, mask: AddWatchFlags, path: &Path) -> Option<FilesystemEvent> {
        let event_type = if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            EventType::Create
        } else if mask.contains(AddWatchFlags::IN_MODIFY) {
            EventType::Write
        } else if mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
            EventType::Remove
        } else if mask.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVE_SELF) {
            EventType::Rename
        } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
            EventType::Chmod
        } else {
            return None;
        };
        let name = path
            .strip_prefix(&self.options.root)
            .map(|relative| relative.display().to_string())
            .unwrap_or_else(|_| path.display().to_string());
        let entry = match event_type {
            _ if !self.options.include_entry => None,
            EventType::Remove | EventType::Rename => None,
            _ => entry_info(path, &self.names).ok(),
        };
        Some(FilesystemEvent {
            name,
            r#type: event_type as i32,
            entry,
        })
    }
}

/// Runs a watch and sends its events to `sender` until the receiver is dropped.
pub async fn forward_events(mut watch: DirWatch, sender: mpsc::Sender<FilesystemEvent>) {
    loop {
        tokio::select! {
            _ = sender.closed() => return,
            result = watch.next_events() => match result {
                Ok(events) => {
                    for event in events {
                        if sender.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(root = %watch.options.root.display(), %err, "failed to read inotify events");
                    return;
                }
            },
        }
    }
}

/// A watcher whose events the client polls with `GetWatcherEvents`.
struct PolledWatcher {
    events: Arc<Mutex<VecDeque<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Polled watchers by id.
#[derive(Default)]
pub struct WatcherRegistry {
    watchers: Mutex<HashMap<String, PolledWatcher>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl WatcherRegistry {
    /// Starts a polled watcher and returns its id.
    pub fn create(&self, mut watch: DirWatch) -> String {
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let buffer = events.clone();
        let task = tokio::spawn(async move {
            loop {
                match watch.next_events().await {
                    Ok(batch) => {
                        let mut buffer = lock(&buffer);
                        for event in batch {
                            if buffer.len() == MAX_BUFFERED_EVENTS {
                                buffer.pop_front();
                            }
                            buffer.push_back(event);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "failed to read inotify events of a polled watcher");
                        return;
                    }
                }
            }
        });
        let id = new_watcher_id();
        lock(&self.watchers).insert(id.clone(), PolledWatcher { events, task });
        id
    }

    /// Takes the events since the last call, or `None` for an unknown id.
    pub fn take_events(&self, id: &str) -> Option<Vec<FilesystemEvent>> {
        let watchers = lock(&self.watchers);
        let watcher = watchers.get(id)?;
        let events = lock(&watcher.events).drain(..).collect();
        Some(events)
    }

    /// Stops a watcher; returns whether it existed.
    pub fn remove(&self, id: &str) -> bool {
        match lock(&self.watchers).remove(id) {
            Some(watcher) => {
                watcher.task.abort();
                true
            }
            None => false,
        }
    }
}

fn new_watcher_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = random.read_exact(&mut bytes);
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dir_watch_reports_create_in_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut watch = DirWatch::new(WatchOptions {
            root: dir.path().to_path_buf(),
            recursive: true,
            include_entry: true,
            allow_network_mounts: false,
        })
        .unwrap();
        std::fs::write(dir.path().join("sub/new.txt"), b"x").unwrap();
        let events = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next_events())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(events[0].name, "sub/new.txt");
        assert_eq!(events[0].r#type(), EventType::Create);
        assert!(events[0].entry.is_some());
    }
}
