//! The local-directory backend: a key is a file below the root directory.
//!
//! A put writes an unnamed file (`O_TMPFILE`) in the destination folder and links it
//! under the final name when it is complete: readers see no file or the complete one,
//! never a partial one, nothing ever appears under a temporary name, and a killed put
//! leaves nothing (the kernel frees the unnamed inode). Replacing an existing object
//! links the new file under a hidden name beside it (`.NAME.labrelay-<random>`) and
//! renames it over the old one. Where `O_TMPFILE` is not supported (or `/proc` is not
//! mounted), a put writes a temporary file in `<root>/.labrelay-staging/` (named
//! `<key hash>.<random>`, see [`STAGING_DIR`](super::STAGING_DIR)) and renames it into
//! place; the staging folder is on the root's filesystem, so the rename is atomic —
//! unless a folder below the root is a symlink to another filesystem, where the rename
//! fails (`EXDEV`) rather than copy. A file is fsynced with its folder unless the put
//! says [`PutOptions::defer_sync`](super::PutOptions::defer_sync) (then
//! [`LocalStorage::sync`] makes everything durable at once). The root must exist (a
//! missing mount point must not silently fill the local disk) unless `create_root =
//! true`; the directories inside it are created as needed, each once per storage.
//! Empty directories left by `delete` are kept: removing them would race with a
//! concurrent put into the same directory.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{
    CancelOnDrop, CopyError, GetOutcome, ObjectInfo, ObjectStorage, PutOptions, PutOutcome,
    STAGING_DIR, StagingSweep, StorageError, TempPath, copy_hashing, copy_hashing_sized, local_io,
    missing_root, section_label, staging_name, validate_key, validate_prefix,
};
use crate::config::StorageConfig;

/// A directory on a local (or mounted) filesystem.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: Arc<PathBuf>,
    /// The `[storage.NAME]` section, for messages (may be empty).
    section: Arc<str>,
    create_root: bool,
    /// Folders known to exist (the staging folder, parents of keys put so far), so a
    /// delivery of 10^5 files in 200 folders makes 200 `mkdir` calls, not 10^5.
    made_dirs: Arc<Mutex<HashSet<PathBuf>>>,
}

impl LocalStorage {
    /// Use `root`, which must be an existing directory.
    pub fn open(root: &Path) -> Result<LocalStorage, StorageError> {
        let storage = LocalStorage {
            root: Arc::new(root.to_owned()),
            section: Arc::from(""),
            create_root: false,
            made_dirs: Arc::default(),
        };
        storage.check_root_blocking()?;
        Ok(storage)
    }

    /// Use `root` for the section `config`: it must be an existing directory, unless
    /// `create_root = true`, which creates it (with its parents).
    pub fn open_config(root: &Path, config: &StorageConfig) -> Result<LocalStorage, StorageError> {
        let storage = LocalStorage {
            root: Arc::new(root.to_owned()),
            section: Arc::from(config.name.as_str()),
            create_root: config.create_root,
            made_dirs: Arc::default(),
        };
        storage.check_root_blocking()?;
        Ok(storage)
    }

    /// Check (or create) the root directory again: a mount can go away.
    pub async fn check_root(&self) -> Result<(), StorageError> {
        let this = self.clone();
        blocking(move || this.check_root_blocking()).await
    }

    fn check_root_blocking(&self) -> Result<(), StorageError> {
        let root = self.root.as_path();
        let target = root.display().to_string();
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(StorageError::Config {
                message: format!(
                    "{}: the base folder {target} is not a directory",
                    section_label(&self.section)
                ),
                target,
            }),
            Err(e) if e.kind() == ErrorKind::NotFound && self.create_root => {
                fs_err::create_dir_all(root).map_err(StorageError::Local)?;
                tracing::info!(root = %target, "created the storage root (create_root = true)");
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Err(missing_root(&self.section, target.clone(), &target))
            }
            Err(e) => Err(local_io("cannot open storage directory", root, &e)),
        }
    }

    /// Make every earlier put durable: `syncfs` of the root's filesystem (for puts with
    /// [`PutOptions::defer_sync`]).
    pub async fn sync(&self) -> Result<(), StorageError> {
        let root = Arc::clone(&self.root);
        blocking(move || {
            let dir = fs_err::File::open(root.as_path()).map_err(StorageError::Local)?;
            rustix::fs::syncfs(&dir)
                .map_err(|e| local_io("syncing the filesystem of", &root, &e.into()))
        })
        .await
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `key`.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    async fn put_from(
        &self,
        reader: Box<dyn Read + Send>,
        key: &str,
        source_file: Option<(PathBuf, u64)>,
        sync: bool,
    ) -> Result<PutOutcome, StorageError> {
        let dest = self.path_of(key)?;
        let staging = self.root.join(STAGING_DIR);
        let key = key.to_owned();
        let (_cancel_guard, cancel) = CancelOnDrop::new();
        let dirs = Arc::clone(&self.made_dirs);
        blocking(move || {
            let put = Put {
                key: &key,
                dest: &dest,
                staging: &staging,
                source_file,
                cancel: &cancel,
                sync,
                dirs: &dirs,
            };
            put_blocking(reader, put)
        })
        .await
    }

    fn not_found(&self, key: &str) -> StorageError {
        StorageError::NotFound {
            target: self.describe(),
            key: key.to_owned(),
        }
    }
}

/// One put, as the blocking thread sees it.
struct Put<'a> {
    key: &'a str,
    dest: &'a Path,
    staging: &'a Path,
    source_file: Option<(PathBuf, u64)>,
    cancel: &'a AtomicBool,
    /// fsync the file and its folder (else the caller syncs the filesystem later).
    sync: bool,
    dirs: &'a Mutex<HashSet<PathBuf>>,
}

fn known_dir(dirs: &Mutex<HashSet<PathBuf>>, dir: &Path) -> bool {
    dirs.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(dir)
}

fn remember_dir(dirs: &Mutex<HashSet<PathBuf>>, dir: &Path) {
    dirs.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(dir.to_owned());
}

/// What [`put_unnamed`] did.
enum Unnamed {
    /// The put ran (or failed): its result.
    Done(Result<PutOutcome, StorageError>),
    /// The filesystem has no O_TMPFILE (or /proc is not mounted): use the staging folder.
    Unsupported(Box<dyn Read + Send>),
}

/// Whether `/proc/self/fd` can name an open file for `linkat` (checked once).
fn proc_fd_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// A put through an unnamed file in the destination folder (see [`put_blocking`]).
fn put_unnamed(
    mut reader: Box<dyn Read + Send>,
    key: &str,
    dest: &Path,
    source_file: Option<&(PathBuf, u64)>,
    cancel: &AtomicBool,
    sync: bool,
    dirs: &Mutex<HashSet<PathBuf>>,
) -> Unnamed {
    use rustix::fs::{AtFlags, CWD, Mode, OFlags};
    use std::os::fd::AsRawFd;
    let Some(dir) = dest.parent() else {
        return Unnamed::Unsupported(reader);
    };
    if !proc_fd_available() {
        return Unnamed::Unsupported(reader);
    }
    if !known_dir(dirs, dir) {
        if let Err(e) = fs_err::create_dir_all(dir) {
            return Unnamed::Done(Err(StorageError::Local(e)));
        }
        remember_dir(dirs, dir);
    }
    let fd = match rustix::fs::openat(
        CWD,
        dir,
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
            return Unnamed::Unsupported(reader);
        }
        Err(e) => return Unnamed::Done(Err(local_io("creating a file in", dir, &e.into()))),
    };
    let mut file = std::fs::File::from(fd);
    let result = (|| {
        let (size, md5) =
            write_hashed(&mut reader, &mut file, key, dest, source_file, cancel, sync)?;
        // The last chance to honour a cancellation: after the link the object is public.
        if cancel.load(Ordering::SeqCst) {
            return Err(cancelled(key, dest));
        }
        let me = format!("/proc/self/fd/{}", file.as_raw_fd());
        match rustix::fs::linkat(CWD, me.as_str(), CWD, dest, AtFlags::SYMLINK_FOLLOW) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                // Replacing an object: link under a hidden name beside it and rename
                // over it (same folder), so readers see the old or the new file.
                let name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let beside = dir.join(format!(".{name}.labrelay-{:016x}", rand::random::<u64>()));
                rustix::fs::linkat(CWD, me.as_str(), CWD, &beside, AtFlags::SYMLINK_FOLLOW)
                    .map_err(|e| local_io("linking", &beside, &e.into()))?;
                if let Err(e) = std::fs::rename(&beside, dest) {
                    let _ = std::fs::remove_file(&beside);
                    return Err(local_io("replacing", dest, &e));
                }
            }
            Err(e) => return Err(local_io("linking", dest, &e.into())),
        }
        if sync {
            sync_dir(dir);
        }
        Ok(outcome(size, md5))
    })();
    if result.is_err() {
        forget_dirs(dirs);
    }
    Unnamed::Done(result)
}

fn put_blocking(reader: Box<dyn Read + Send>, put: Put<'_>) -> Result<PutOutcome, StorageError> {
    let Put {
        key,
        dest,
        staging,
        source_file,
        cancel,
        sync,
        dirs,
    } = put;
    // First choice: an unnamed file (O_TMPFILE) in the destination folder, linked into
    // place when complete. Nothing is ever visible under a temporary name, a killed put
    // leaves nothing at all (the kernel frees the unnamed inode), and there is no rename
    // across folders (which serializes on the filesystem's rename lock: 10^5 files
    // through one staging folder spent most of their time there).
    let mut reader = match put_unnamed(reader, key, dest, source_file.as_ref(), cancel, sync, dirs)
    {
        Unnamed::Done(r) => return r,
        Unnamed::Unsupported(reader) => reader,
    };
    // Not create_dir_all: the root must exist, and a vanished mount point must not be
    // recreated on the local disk.
    if !known_dir(dirs, staging) {
        match fs_err::create_dir(staging) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StorageError::Local(e)),
        }
        remember_dir(dirs, staging);
    }
    let temp = TempPath::at(staging.join(staging_name(key)));
    let mut file = fs_err::File::create(temp.path()).map_err(StorageError::Local)?;
    let (size, md5) = write_hashed(
        &mut reader,
        file.file_mut(),
        key,
        dest,
        source_file.as_ref(),
        cancel,
        sync,
    )?;
    drop(file);
    // The last chance to honour a cancellation: after the rename the object is public.
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled(key, dest));
    }
    if let Some(dir) = dest.parent()
        && !known_dir(dirs, dir)
    {
        fs_err::create_dir_all(dir).map_err(StorageError::Local)?;
        remember_dir(dirs, dir);
    }
    if let Err(e) = temp.persist(dest) {
        forget_dirs(dirs);
        return Err(e);
    }
    if sync && let Some(dir) = dest.parent() {
        sync_dir(dir);
    }
    Ok(outcome(size, md5))
}

/// Copy `reader` into `file` (the put of `key` to `dest`), hashing; check the size
/// against the source file's, and fsync when `sync`.
fn write_hashed(
    reader: &mut dyn Read,
    file: &mut std::fs::File,
    key: &str,
    dest: &Path,
    source_file: Option<&(PathBuf, u64)>,
    cancel: &AtomicBool,
    sync: bool,
) -> Result<(u64, [u8; 16]), StorageError> {
    let (size, md5) =
        match copy_hashing_sized(reader, file, Some(cancel), source_file.map(|(_, len)| *len)) {
            Ok(r) => r,
            Err(CopyError::Read(e)) if source_file.is_some() => return Err(StorageError::Local(e)),
            Err(CopyError::Read(source)) => {
                return Err(StorageError::Source {
                    key: key.to_owned(),
                    source,
                });
            }
            Err(CopyError::Write(e)) => return Err(local_io("writing", dest, &e)),
            Err(CopyError::Cancelled) => return Err(cancelled(key, dest)),
        };
    if let Some((path, expected)) = source_file
        && *expected != size
    {
        return Err(StorageError::Changed {
            path: path.clone(),
            expected: *expected,
            actual: size,
        });
    }
    if sync {
        file.sync_all().map_err(|e| local_io("syncing", dest, &e))?;
    }
    Ok((size, md5))
}

/// Make a rename or link into `dir` durable; not every filesystem supports fsync on a
/// directory, and the data is already safe, so a failure is only logged.
fn sync_dir(dir: &Path) {
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), "fsync of directory failed: {e}");
    }
}

/// A folder removed behind our back since it was remembered: forget them all.
fn forget_dirs(dirs: &Mutex<HashSet<PathBuf>>) {
    dirs.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
}

fn outcome(size: u64, md5: [u8; 16]) -> PutOutcome {
    PutOutcome {
        size,
        md5_hex: hex::encode(md5),
        etag: None,
        parts: 0,
        part_size: 0,
        part_md5_hex: Vec::new(),
        range_size: 0,
        range_md5_hex: Vec::new(),
        retries: 0,
    }
}

fn cancelled(key: &str, dest: &Path) -> StorageError {
    StorageError::Backend {
        target: dest.display().to_string(),
        op: "put",
        key: key.to_owned(),
        message: "cancelled".into(),
        temporary: false,
    }
}

/// Run blocking filesystem work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StorageError::Local(std::io::Error::other(format!("storage worker failed: {e}")))
    })?
}

fn info(key: String, meta: &std::fs::Metadata) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.len(),
        etag: None,
        last_modified: meta.modified().ok().map(DateTime::<Utc>::from),
    }
}

fn walk(dir: &Path, key_prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), StorageError> {
    let entries = match fs_err::read_dir(dir) {
        Ok(e) => e,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            return Ok(());
        }
        Err(e) => return Err(StorageError::Local(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StorageError::Local)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(path = %entry.path().display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        let key = if key_prefix.is_empty() {
            name.clone()
        } else {
            format!("{key_prefix}/{name}")
        };
        let file_type = entry.file_type().map_err(StorageError::Local)?;
        if key_prefix.is_empty() && name == STAGING_DIR {
            // Uploads in progress (or killed before they could clean up).
        } else if file_type.is_dir() {
            walk(&entry.path(), &key, out)?;
        } else {
            // Follows symlinks to files; symlinked directories are not entered (loops).
            match fs_err::metadata(entry.path()) {
                Ok(m) if m.is_file() => out.push(info(key, &m)),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::Local(e)),
            }
        }
    }
    Ok(())
}

impl ObjectStorage for LocalStorage {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn put_file(
        &self,
        local: &Path,
        key: &str,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        validate_key(key)?;
        let file = fs_err::File::open(local).map_err(StorageError::Local)?;
        let len = file.metadata().map_err(StorageError::Local)?.len();
        self.put_from(
            Box::new(file),
            key,
            Some((local.to_owned(), len)),
            !opts.defer_sync,
        )
        .await
    }

    async fn put_reader<R: Read + Send + 'static>(
        &self,
        reader: R,
        key: &str,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        self.put_from(Box::new(reader), key, None, !opts.defer_sync)
            .await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<PutOutcome, StorageError> {
        self.put_from(Box::new(std::io::Cursor::new(data)), key, None, true)
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(move || match fs_err::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(info(key, &m))),
            Ok(_) => Ok(None),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                Ok(None)
            }
            Err(e) => Err(StorageError::Local(e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let prefix = validate_prefix(prefix)?;
        let dir = if prefix.is_empty() {
            self.root.as_ref().clone()
        } else {
            self.root.join(&prefix)
        };
        blocking(move || {
            let mut out = Vec::new();
            walk(&dir, &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn get_into<W: Write + Send + 'static>(
        &self,
        key: &str,
        mut writer: W,
    ) -> Result<GetOutcome, StorageError> {
        let path = self.path_of(key)?;
        let not_found = self.not_found(key);
        blocking(move || {
            let mut file = match fs_err::File::open(&path) {
                Ok(f) => f,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                    return Err(not_found);
                }
                Err(e) => return Err(StorageError::Local(e)),
            };
            let (size, md5) = copy_hashing(&mut file, &mut writer, None).map_err(|e| match e {
                CopyError::Read(e) => StorageError::Local(e),
                CopyError::Write(e) => local_io("writing the download of", &path, &e),
                CopyError::Cancelled => {
                    StorageError::Local(std::io::Error::other("download cancelled"))
                }
            })?;
            Ok(GetOutcome {
                size,
                md5_hex: hex::encode(md5),
            })
        })
        .await
    }

    async fn get_bytes(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path_of(key)?;
        let not_found = self.not_found(key);
        blocking(move || match fs_err::read(&path) {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                Err(not_found)
            }
            Err(e) => Err(StorageError::Local(e)),
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        blocking(move || match fs_err::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(()),
            Err(e) => Err(StorageError::Local(e)),
        })
        .await
    }

    async fn clean_staging(&self, keys: &[String]) -> Result<u64, StorageError> {
        let staging = self.root.join(STAGING_DIR);
        let sweep = StagingSweep::new(keys);
        blocking(move || {
            let entries = match fs_err::read_dir(&staging) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(StorageError::Local(e)),
            };
            let mut removed = 0;
            for entry in entries {
                let entry = entry.map_err(StorageError::Local)?;
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(local_io("inspecting", &entry.path(), &e)),
                };
                // Only files: the backend never creates anything else there.
                if !meta.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if sweep.removes(&name, meta.modified().ok()) {
                    match fs_err::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(StorageError::Local(e)),
                    }
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn presign_get(
        &self,
        key: &str,
        _expires_in: Duration,
    ) -> Result<Option<url::Url>, StorageError> {
        validate_key(key)?;
        Ok(None)
    }
}
