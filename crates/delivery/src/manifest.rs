//! The manifest: every file of a delivery folder, found before any byte moves.
//!
//! The walk applies the include/exclude globs, follows symbolic links (pipeline outputs
//! are often symlinks into a results tree) unless told not to, and collects every
//! problem — a broken symlink, an unreadable file or directory, a symlink loop, a
//! special file, a name that cannot be a key — so the caller can refuse the whole
//! delivery and list them all at once. Hashes are not computed here: the upload computes
//! them while the bytes stream, so each file is read once.
//!
//! Object keys must be UTF-8. A file name that is not is decoded as GB18030 (names
//! written by Chinese Windows tools) when that decodes cleanly, otherwise each invalid
//! byte becomes `%XX`; control characters become `%XX` too. The entry remembers the
//! original name so the rename can be reported.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;

/// Include/exclude patterns, matched against `/`-separated paths relative to the
/// delivery folder (`**` crosses directories, `*` does not).
#[derive(Debug, Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

impl Filter {
    /// Compile the patterns; the error names the bad one.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter, String> {
        let build = |pats: &[String]| -> Result<GlobSet, String> {
            let mut b = GlobSetBuilder::new();
            for p in pats {
                let g = globset::GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("bad glob pattern {p:?}: {e}"))?;
                b.add(g);
            }
            b.build().map_err(|e| e.to_string())
        };
        let include = if include.is_empty() {
            build(&["**".to_owned()])?
        } else {
            build(include)?
        };
        Ok(Filter {
            include,
            exclude: build(exclude)?,
        })
    }

    /// Everything, nothing excluded.
    pub fn all() -> Filter {
        let mut b = GlobSetBuilder::new();
        if let Ok(g) = Glob::new("**") {
            b.add(g);
        }
        Filter {
            include: b.build().unwrap_or_else(|_| GlobSet::empty()),
            exclude: GlobSet::empty(),
        }
    }

    fn file_wanted(&self, rel: &str) -> bool {
        self.include.is_match(rel) && !self.exclude.is_match(rel)
    }

    fn dir_excluded(&self, rel: &str) -> bool {
        self.exclude.is_match(rel)
    }
}

/// One file to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where the bytes are read from (inside the folder, possibly through symlinks).
    pub path: PathBuf,
    /// Path relative to the folder, `/`-separated, valid as a key.
    pub rel: String,
    /// Size at walk time.
    pub size: u64,
    /// Modification time at walk time, nanoseconds since the epoch (detects a file that
    /// changed between a crash and the resume).
    pub mtime_ns: i64,
    /// The original relative path when the name was not UTF-8 (lossy, for messages).
    pub renamed_from: Option<String>,
}

/// Something that stops the delivery before any upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The path (lossy UTF-8).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The walk's result.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// The folder.
    pub root: PathBuf,
    /// Files to deliver, sorted by `rel`.
    pub entries: Vec<Entry>,
    /// Problems; a delivery with any is refused.
    pub problems: Vec<Problem>,
    /// Things skipped on purpose (symlinks when not followed, a stale md5sum.txt), for
    /// the log.
    pub skipped: Vec<Problem>,
}

impl Manifest {
    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// Options of [`walk`].
#[derive(Debug, Clone)]
pub struct WalkOptions {
    /// The globs.
    pub filter: Filter,
    /// Follow symlinks (only those whose target stays inside the folder or
    /// `allowed_roots`).
    pub follow_symlinks: bool,
    /// Folders besides the delivery folder itself that a followed symlink may lead into
    /// (`[delivery] data_roots`).
    pub allowed_roots: Vec<PathBuf>,
    /// Names at the top of the folder that the delivery writes itself (md5sum.txt):
    /// a source file of that name is skipped.
    pub reserved: Vec<String>,
}

/// Walk `root`. Fails only when `root` itself is not a readable directory; every other
/// problem is collected in [`Manifest::problems`].
pub fn walk(root: &Path, opts: &WalkOptions) -> Result<Manifest, Problem> {
    let meta = fs_err::metadata(root).map_err(|e| Problem {
        path: root.display().to_string(),
        message: io_message(&e),
    })?;
    if !meta.is_dir() {
        return Err(Problem {
            path: root.display().to_string(),
            message: "not a directory".into(),
        });
    }
    let mut m = Manifest {
        root: root.to_owned(),
        ..Manifest::default()
    };
    let mut ancestors = HashSet::new();
    ancestors.insert((meta.dev(), meta.ino()));
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    // Links may lead anywhere inside the folder (as it really is on disk) or the
    // configured roots, nowhere else.
    let mut opts = opts.clone();
    let canon_root = std::fs::canonicalize(root).map_err(|e| Problem {
        path: root.display().to_string(),
        message: io_message(&e),
    })?;
    opts.allowed_roots = opts
        .allowed_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    opts.allowed_roots.push(canon_root);
    walk_dir(root, "", "", &opts, &mut ancestors, &mut m, &mut keys);
    m.entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    m.problems.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(m)
}

/// Where no delivery ever reads, whatever links or configuration say.
pub const FORBIDDEN_ROOTS: &[&str] = &["/proc", "/sys", "/dev"];

/// Whether a canonical path lies under one of [`FORBIDDEN_ROOTS`].
pub fn is_forbidden(canonical: &Path) -> bool {
    FORBIDDEN_ROOTS
        .iter()
        .any(|r| canonical.starts_with(Path::new(r)))
}

/// Why a symlink whose canonical target is `target` may not be followed, if it may not.
fn link_refusal(target: &Path, allowed: &[PathBuf]) -> Option<String> {
    if is_forbidden(target) {
        return Some(format!(
            "symbolic link to {} is refused: nothing under {} is ever delivered",
            target.display(),
            FORBIDDEN_ROOTS.join(", ")
        ));
    }
    if allowed.iter().any(|r| target.starts_with(r)) {
        return None;
    }
    Some(format!(
        "symbolic link to {} is refused: it leads outside the analysis folder and \
         [delivery] data_roots",
        target.display()
    ))
}

fn io_message(e: &std::io::Error) -> String {
    // fs-err's message repeats the path; keep only the OS reason for the problem list.
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::NotFound => "does not exist".into(),
        _ => std::io::Error::from(e.kind()).to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
fn walk_dir(
    dir: &Path,
    rel_dir: &str,
    lossy_dir: &str,
    opts: &WalkOptions,
    ancestors: &mut HashSet<(u64, u64)>,
    m: &mut Manifest,
    keys: &mut BTreeMap<String, String>,
) {
    let problem = |path: &Path, message: String| Problem {
        path: path.display().to_string(),
        message,
    };
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) => {
            m.problems.push(problem(
                dir,
                format!("cannot list directory: {}", io_message(&e)),
            ));
            return;
        }
    };
    let mut children: Vec<std::fs::DirEntry> = Vec::new();
    for entry in read {
        match entry {
            Ok(e) => children.push(e),
            Err(e) => m.problems.push(problem(
                dir,
                format!("cannot list directory: {}", io_message(&e)),
            )),
        }
    }
    children.sort_by_key(std::fs::DirEntry::file_name);
    for child in children {
        let path = child.path();
        let name = child.file_name();
        let key_name = key_component(&name);
        let rel = join(rel_dir, &key_name);
        let lossy = join(lossy_dir, &name.to_string_lossy());
        let Ok(lmeta) = std::fs::symlink_metadata(&path) else {
            m.problems
                .push(problem(&path, "vanished during the walk".into()));
            continue;
        };
        // Where the bytes are read from: the real target of a followed link.
        let mut real_path = path.clone();
        let meta = if lmeta.file_type().is_symlink() {
            if !opts.follow_symlinks {
                m.skipped
                    .push(problem(&path, "symbolic link not followed".into()));
                continue;
            }
            // Contain the link: its real target must stay inside the allowed roots, and
            // the bytes are read from that real target (not through the link again).
            if let Ok(real) = std::fs::canonicalize(&path) {
                if let Some(why) = link_refusal(&real, &opts.allowed_roots) {
                    m.problems.push(problem(&path, why));
                    continue;
                }
                real_path = real;
            }
            match std::fs::metadata(&real_path) {
                Ok(t) => t,
                Err(e) => {
                    let target = std::fs::read_link(&path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    let why = if e.kind() == std::io::ErrorKind::NotFound {
                        format!("broken symbolic link (points to {target}, which does not exist)")
                    } else {
                        format!(
                            "symbolic link to {target} cannot be followed: {}",
                            io_message(&e)
                        )
                    };
                    m.problems.push(problem(&path, why));
                    continue;
                }
            }
        } else {
            lmeta
        };
        if meta.is_dir() {
            if opts.filter.dir_excluded(&rel) {
                continue;
            }
            let id = (meta.dev(), meta.ino());
            if !ancestors.insert(id) {
                m.problems.push(problem(
                    &path,
                    "symbolic link loop (points to a directory that contains it)".into(),
                ));
                continue;
            }
            walk_dir(&real_path, &rel, &lossy, opts, ancestors, m, keys);
            ancestors.remove(&id);
            continue;
        }
        if !meta.is_file() {
            if opts.filter.file_wanted(&rel) {
                m.problems.push(problem(
                    &path,
                    "not a regular file (fifo, socket or device)".into(),
                ));
            }
            continue;
        }
        if !opts.filter.file_wanted(&rel) {
            continue;
        }
        if rel_dir.is_empty() && opts.reserved.iter().any(|r| r == &rel) {
            m.skipped.push(problem(
                &path,
                "replaced by the manifest this delivery generates".into(),
            ));
            continue;
        }
        if let Err(e) = labrelay::storage::validate_key(&rel) {
            m.problems.push(problem(
                &path,
                format!("cannot be delivered under this name: {e}"),
            ));
            continue;
        }
        if let Some(other) = keys.insert(rel.clone(), lossy.clone()) {
            m.problems.push(problem(
                &path,
                format!("its name maps to the same key {rel:?} as {other}"),
            ));
            continue;
        }
        // Proves readability now (access(2): one call, no open and close), instead of
        // failing halfway through the upload.
        if let Err(e) = rustix::fs::access(&real_path, rustix::fs::Access::READ_OK) {
            m.problems.push(problem(
                &path,
                format!("unreadable: {}", io_message(&e.into())),
            ));
            continue;
        }
        let mtime_ns = meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec());
        m.entries.push(Entry {
            path: real_path,
            renamed_from: (lossy != rel).then_some(lossy),
            rel,
            size: meta.len(),
            mtime_ns,
        });
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// A file name as a key component: UTF-8 as is; otherwise GB18030 when it decodes
/// cleanly, else `%XX` for each invalid byte. Control characters become `%XX`.
pub fn key_component(name: &OsStr) -> String {
    let bytes = name.as_bytes();
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => {
            match encoding_rs::GB18030.decode_without_bom_handling_and_without_replacement(bytes) {
                Some(s) => s.into_owned(),
                None => percent_invalid(bytes),
            }
        }
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).as_bytes() {
                push_hex(&mut out, *b);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn push_hex(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

fn percent_invalid(mut bytes: &[u8]) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, rest) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                let bad = e.error_len().unwrap_or(rest.len()).max(1);
                for b in &rest[..bad] {
                    push_hex(&mut out, *b);
                }
                bytes = &rest[bad..];
            }
        }
    }
}

/// One line of a coreutils checksum file (`md5sum -c` reads it): `<hash>  <name>`; a
/// name with a backslash or newline is escaped and the line starts with `\`.
pub fn checksum_line(hash: &str, name: &str) -> String {
    if name.contains(['\\', '\n', '\r']) {
        let escaped = name
            .replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('\r', "\\r");
        format!("\\{hash}  {escaped}\n")
    } else {
        format!("{hash}  {name}\n")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn opts() -> WalkOptions {
        WalkOptions {
            filter: Filter::all(),
            follow_symlinks: true,
            allowed_roots: Vec::new(),
            reserved: vec!["md5sum.txt".into()],
        }
    }

    #[test]
    fn walks_nested_folders_symlinks_and_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("upload");
        fs_err::create_dir_all(root.join("a/b")).unwrap();
        fs_err::write(root.join("a/b/c.txt"), "c").unwrap();
        fs_err::write(root.join("empty"), "").unwrap();
        fs_err::write(root.join("md5sum.txt"), "stale").unwrap();
        let outside = dir.path().join("outside.fastq.gz");
        fs_err::write(&outside, "reads").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link.fastq.gz")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("dirlink")).unwrap();
        // GBK "报告" (not UTF-8) and a byte that is neither.
        fs_err::write(root.join(OsStr::from_bytes(b"\xb1\xa8\xb8\xe6.txt")), "r").unwrap();
        fs_err::write(root.join(OsStr::from_bytes(b"x\xff.txt")), "x").unwrap();
        // The link leads outside the folder: allowed only through data_roots.
        let with_roots = WalkOptions {
            allowed_roots: vec![dir.path().to_owned()],
            ..opts()
        };
        let m = walk(&root, &with_roots).unwrap();
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        let rels: Vec<&str> = m.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(
            rels,
            [
                "a/b/c.txt",
                "dirlink/b/c.txt",
                "empty",
                "link.fastq.gz",
                "x%FF.txt",
                "报告.txt"
            ]
        );
        assert_eq!(m.entries[3].size, 5);
        assert!(m.entries[5].renamed_from.is_some());
        assert_eq!(m.skipped.len(), 1);
        assert_eq!(m.total_bytes(), 1 + 1 + 5 + 1 + 1);
    }

    #[test]
    fn regression_symlinks_out_of_the_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("upload");
        fs_err::create_dir_all(root.join("sub")).unwrap();
        fs_err::write(root.join("sub/in.txt"), "in").unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs_err::create_dir_all(&elsewhere).unwrap();
        fs_err::write(elsewhere.join("secret"), "s").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", root.join("shadow")).unwrap();
        std::os::unix::fs::symlink("/etc/ssh", root.join("ssh")).unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", root.join("environ")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("elsewhere")).unwrap();
        // Inside the folder, even through `..`: fine.
        std::os::unix::fs::symlink("../upload/sub/in.txt", root.join("inner")).unwrap();
        let m = walk(&root, &opts()).unwrap();
        let msgs: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        let rels: Vec<&str> = m.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["inner", "sub/in.txt"], "{msgs:?}");
        assert_eq!(m.problems.len(), 4, "{msgs:?}");
        for (link, what) in [
            ("elsewhere", "outside the analysis folder"),
            ("environ", "/proc"),
            ("shadow", "outside the analysis folder"),
            ("ssh", "outside the analysis folder"),
        ] {
            assert!(
                msgs.iter()
                    .any(|m| m.contains(&format!("upload/{link}:")) && m.contains(what)),
                "{link}: {msgs:?}"
            );
        }
        // The bytes are read from the real file, not through the link.
        assert_eq!(
            m.entries[0].path,
            std::fs::canonicalize(root.join("sub/in.txt")).unwrap()
        );
        // A configured data root admits its tree, still never /proc.
        let roots = WalkOptions {
            allowed_roots: vec![elsewhere.clone(), "/proc".into()],
            ..opts()
        };
        let m = walk(&root, &roots).unwrap();
        let rels: Vec<&str> = m.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["elsewhere/secret", "inner", "sub/in.txt"]);
        assert_eq!(m.problems.len(), 3);
    }

    #[test]
    fn problems_are_all_collected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink(root.join("missing"), root.join("broken")).unwrap();
        std::os::unix::fs::symlink(root, root.join("loop")).unwrap();
        fs_err::write(root.join("ok"), "x").unwrap();
        fs_err::write(root.join("x.partial"), "x").unwrap();
        let m = walk(root, &opts()).unwrap();
        let msgs: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        assert_eq!(m.problems.len(), 2, "{msgs:?}");
        assert!(msgs[0].contains("broken symbolic link"), "{msgs:?}");
        assert!(msgs[1].contains("loop"), "{msgs:?}");
        // A real file named *.partial is an ordinary file (uploads stage elsewhere).
        assert_eq!(m.entries.len(), 2);
        let no_follow = WalkOptions {
            follow_symlinks: false,
            ..opts()
        };
        let m = walk(root, &no_follow).unwrap();
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        assert_eq!(m.skipped.len(), 2);
        assert!(walk(&root.join("nope"), &opts()).is_err());
    }

    #[test]
    fn globs_include_and_exclude() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs_err::create_dir_all(root.join("tmp/deep")).unwrap();
        fs_err::create_dir_all(root.join("res")).unwrap();
        fs_err::write(root.join("tmp/deep/x.txt"), "x").unwrap();
        fs_err::write(root.join("res/a.txt"), "a").unwrap();
        fs_err::write(root.join("res/a.log"), "a").unwrap();
        fs_err::write(root.join("top.txt"), "t").unwrap();
        let o = WalkOptions {
            filter: Filter::new(&["**/*.txt".into()], &["tmp".into()]).unwrap(),
            ..opts()
        };
        let m = walk(root, &o).unwrap();
        let rels: Vec<&str> = m.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["res/a.txt", "top.txt"]);
        assert!(Filter::new(&["a/{b".into()], &[]).is_err());
    }

    #[test]
    fn checksum_lines_follow_coreutils() {
        assert_eq!(checksum_line("abc", "a b/c"), "abc  a b/c\n");
        assert_eq!(checksum_line("abc", "a\\b"), "\\abc  a\\\\b\n");
        assert_eq!(key_component(OsStr::new("a\nb")), "a%0Ab");
    }
}
