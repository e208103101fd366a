//! The `filesystem.Filesystem` Connect service. Operations run as root with paths
//! resolved against the requesting user's home, and new entries are owned by that user.

pub mod entry;
pub mod watch;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use hearth_envd_proto::filesystem::{
    watch_dir_response, CreateWatcherRequest, CreateWatcherResponse, EntryInfo,
    GetWatcherEventsRequest, GetWatcherEventsResponse, ListDirRequest, ListDirResponse,
    MakeDirRequest, MakeDirResponse, MoveRequest, MoveResponse, RemoveRequest, RemoveResponse,
    RemoveWatcherRequest, RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest,
    WatchDirResponse,
};
use tokio::sync::mpsc;

use crate::connect::{self, Code, ResponseStream, RpcContext, RpcError};
use crate::state::{resolve_path, AppState};
use crate::users::{NameTable, User};
use entry::{chown_to, create_dirs_owned, entry_info};
use watch::{DirWatch, WatchError, WatchOptions};

/// Routes of the service under `/filesystem.Filesystem/`.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route("/filesystem.Filesystem/GetWatcherEvents", post(get_watcher_events))
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
}

fn io_error(path: &Path, err: io::Error) -> RpcError {
    let message = format!("{}: {err}", path.display());
    match err.kind() {
        io::ErrorKind::NotFound => RpcError::not_found(format!("path not found: {message}")),
        io::ErrorKind::AlreadyExists => RpcError::new(Code::AlreadyExists, message),
        io::ErrorKind::PermissionDenied => RpcError::new(Code::PermissionDenied, message),
        io::ErrorKind::InvalidInput
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::DirectoryNotEmpty => RpcError::invalid_argument(message),
        _ => RpcError::internal(message),
    }
}

fn request_user(state: &AppState, context: &RpcContext) -> Result<User, RpcError> {
    state
        .request_user(&context.headers)
        .map_err(|err| RpcError::invalid_argument(err.to_string()))
}

/// Runs blocking filesystem work off the runtime thread.
async fn blocking<T, F>(work: F) -> Result<T, RpcError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RpcError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| RpcError::internal(format!("filesystem task failed: {err}")))?
}

async fn stat(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |context, message: StatRequest| async move {
        let user = request_user(&state, &context)?;
        let path = resolve_path(&message.path, &user.home);
        blocking(move || {
            let entry = entry_info(&path, &NameTable::load()).map_err(|err| io_error(&path, err))?;
            Ok(StatResponse { entry: Some(entry) })
        })
        .await
    })
    .await
}

async fn make_dir(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |context, message: MakeDirRequest| async move {
        let user = request_user(&state, &context)?;
        let path = resolve_path(&message.path, &user.home);
        blocking(move || {
            if path.exists() {
                let kind = if path.is_dir() { "directory" } else { "file" };
                return Err(RpcError::new(
                    Code::AlreadyExists,
                    format!("{kind} {} already exists", path.display()),
                ));
            }
            create_dirs_owned(&path, &user).map_err(|err| io_error(&path, err))?;
            let entry = entry_info(&path, &NameTable::load()).map_err(|err| io_error(&path, err))?;
            Ok(MakeDirResponse { entry: Some(entry) })
        })
        .await
    })
    .await
}

async fn move_entry(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |context, message: MoveRequest| async move {
        let user = request_user(&state, &context)?;
        let source = resolve_path(&message.source, &user.home);
        let destination = resolve_path(&message.destination, &user.home);
        blocking(move || {
            std::fs::symlink_metadata(&source).map_err(|err| io_error(&source, err))?;
            if let Some(parent) = destination.parent() {
                create_dirs_owned(parent, &user).map_err(|err| io_error(parent, err))?;
            }
            std::fs::rename(&source, &destination).map_err(|err| io_error(&destination, err))?;
            let entry = entry_info(&destination, &NameTable::load())
                .map_err(|err| io_error(&destination, err))?;
            Ok(MoveResponse { entry: Some(entry) })
        })
        .await
    })
    .await
}

fn list_entries(
    dir: &Path,
    depth: u32,
    names: &NameTable,
    entries: &mut Vec<EntryInfo>,
) -> io::Result<()> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    children.sort();
    for child in children {
        let Ok(entry) = entry_info(&child, names) else {
            continue;
        };
        // Symlinked directories are listed but not entered, so cycles cannot recurse.
        let descend = depth > 1
            && !entry.is_symlink
            && entry.r#type() == hearth_envd_proto::filesystem::FileType::Directory;
        entries.push(entry);
        if descend {
            let _ = list_entries(&child, depth - 1, names, entries);
        }
    }
    Ok(())
}

async fn list_dir(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |context, message: ListDirRequest| async move {
        let user = request_user(&state, &context)?;
        let path = resolve_path(&message.path, &user.home);
        let depth = message.depth.max(1);
        blocking(move || {
            let metadata = std::fs::metadata(&path).map_err(|err| io_error(&path, err))?;
            if !metadata.is_dir() {
                return Err(RpcError::invalid_argument(format!(
                    "path {} is not a directory",
                    path.display()
                )));
            }
            let mut entries = Vec::new();
            list_entries(&path, depth, &NameTable::load(), &mut entries)
                .map_err(|err| io_error(&path, err))?;
            Ok(ListDirResponse { entries })
        })
        .await
    })
    .await
}

async fn remove(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |context, message: RemoveRequest| async move {
        let user = request_user(&state, &context)?;
        let path = resolve_path(&message.path, &user.home);
        blocking(move || {
            let metadata = std::fs::symlink_metadata(&path).map_err(|err| io_error(&path, err))?;
            let result = if metadata.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            result.map_err(|err| io_error(&path, err))?;
            Ok(RemoveResponse {})
        })
        .await
    })
    .await
}

fn watch_error(err: WatchError) -> RpcError {
    match err {
        WatchError::NotFound(_) => RpcError::not_found(err.to_string()),
        WatchError::NotDirectory(_) | WatchError::NetworkMount { .. } => {
            RpcError::invalid_argument(err.to_string())
        }
        WatchError::Inotify { .. } | WatchError::Register(_) => {
            let source = std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default();
            RpcError::internal(format!("{err}: {source}"))
        }
    }
}

async fn start_watch(state: &AppState, context: &RpcContext, path: &str, recursive: bool, include_entry: bool, allow_network_mounts: bool) -> Result<DirWatch, RpcError> {
    let user = request_user(state, context)?;
    let options = WatchOptions {
        root: resolve_path(path, &user.home),
        recursive,
        include_entry,
        allow_network_mounts,
    };
    DirWatch::new(options).map_err(watch_error)
}

async fn watch_dir(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::server_stream(request, |context, message: WatchDirRequest| async move {
        let watch = start_watch(
            &state,
            &context,
            &message.path,
            message.recursive,
            message.include_entry,
            message.allow_network_mounts,
        )
        .await?;
        let (sender, receiver) = mpsc::channel(watch::STREAM_CHANNEL_EVENTS);
        tokio::spawn(watch::forward_events(watch, sender));
        Ok(watch_stream(receiver, context.keepalive))
    })
    .await
}

fn watch_stream(
    events: mpsc::Receiver<hearth_envd_proto::filesystem::FilesystemEvent>,
    keepalive: Option<std::time::Duration>,
) -> ResponseStream<WatchDirResponse> {
    let start = WatchDirResponse {
        event: Some(watch_dir_response::Event::Start(watch_dir_response::StartEvent {})),
    };
    let ticker = keepalive.map(|interval| {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    let rest = futures::stream::unfold((events, ticker), |(mut events, mut ticker)| async move {
        let next = match ticker.as_mut() {
            Some(ticker) => tokio::select! {
                event = events.recv() => event.map(watch_dir_response::Event::Filesystem),
                _ = ticker.tick() => Some(watch_dir_response::Event::Keepalive(watch_dir_response::KeepAlive {})),
            },
            None => events.recv().await.map(watch_dir_response::Event::Filesystem),
        };
        next.map(|event| (WatchDirResponse { event: Some(event) }, (events, ticker)))
    });
    Box::pin(futures::stream::iter([start]).chain(rest).map(Ok))
}

async fn create_watcher(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |context, message: CreateWatcherRequest| async move {
        let watch = start_watch(
            &state,
            &context,
            &message.path,
            message.recursive,
            message.include_entry,
            message.allow_network_mounts,
        )
        .await?;
        let watcher_id = state.watchers.create(watch);
        Ok(CreateWatcherResponse { watcher_id })
    })
    .await
}

async fn get_watcher_events(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, message: GetWatcherEventsRequest| async move {
        let events = state
            .watchers
            .take_events(&message.watcher_id)
            .ok_or_else(|| RpcError::not_found(format!("watcher {:?} not found", message.watcher_id)))?;
        Ok(GetWatcherEventsResponse { events })
    })
    .await
}

async fn remove_watcher(State(state): State<Arc<AppState>>, request: Request) -> Response {
    connect::unary(request, |_context, message: RemoveWatcherRequest| async move {
        if !state.watchers.remove(&message.watcher_id) {
            return Err(RpcError::not_found(format!("watcher {:?} not found", message.watcher_id)));
        }
        Ok(RemoveWatcherResponse {})
    })
    .await
}

/// Changes the owner of a new file to the requesting user; used by uploads too.
pub fn chown_new(path: &Path, user: &User) -> io::Result<()> {
    chown_to(path, user)
}
