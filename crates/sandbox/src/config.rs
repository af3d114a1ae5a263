//! `[sandbox]` (how boxes are built) and `[languages.NAME]` (what runs in them), checked
//! once at start so that a bad entry exits 78 before any code runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use labrelay::config::{Config, ConfigError};
use serde::{Deserialize, Serialize};

/// The languages shipped with labrelay (`crates/sandbox/languages.toml`).
pub const SHIPPED: &str = include_str!("../languages.toml");

/// Limits of one step (compile or run) of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time of every process of the box together, seconds.
    pub time_secs: f64,
    /// Wall-clock time, seconds.
    pub wall_secs: f64,
    /// Memory of the box (resident memory and the tmpfs it wrote), MiB.
    pub memory_mib: u64,
    /// Processes and threads at once.
    pub processes: u32,
    /// Largest file the box may write, MiB.
    pub file_mib: u64,
    /// Size of the box's tmpfs, MiB.
    pub disk_mib: u64,
    /// Files and directories in the box's tmpfs.
    pub inodes: u64,
    /// Bytes of stdout, and of stderr, KiB; more is "Output Limit Exceeded".
    pub output_kib: u64,
}

impl Limits {
    /// Defaults of a run step.
    pub const RUN: Limits = Limits {
        time_secs: 5.0,
        wall_secs: 10.0,
        memory_mib: 256,
        processes: 64,
        file_mib: 64,
        disk_mib: 64,
        inodes: 4096,
        output_kib: 1024,
    };

    /// Defaults of a compile step.
    pub const COMPILE: Limits = Limits {
        time_secs: 30.0,
        wall_secs: 60.0,
        memory_mib: 1024,
        processes: 64,
        file_mib: 128,
        disk_mib: 256,
        inodes: 16384,
        output_kib: 64,
    };

    fn merge(self, p: &PartialLimits) -> Limits {
        Limits {
            time_secs: p.time_secs.unwrap_or(self.time_secs),
            wall_secs: p.wall_secs.unwrap_or(self.wall_secs),
            memory_mib: p.memory_mib.unwrap_or(self.memory_mib),
            processes: p.processes.unwrap_or(self.processes),
            file_mib: p.file_mib.unwrap_or(self.file_mib),
            disk_mib: p.disk_mib.unwrap_or(self.disk_mib),
            inodes: p.inodes.unwrap_or(self.inodes),
            output_kib: p.output_kib.unwrap_or(self.output_kib),
        }
    }

    /// The first limit that makes no sense, by its key.
    fn check(&self) -> Result<(), String> {
        let positive = [("time_secs", self.time_secs), ("wall_secs", self.wall_secs)];
        for (k, v) in positive {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return Err(format!("{k} must be between 0 and 86400, got {v}"));
            }
        }
        for (k, v) in [
            ("memory_mib", self.memory_mib),
            ("processes", u64::from(self.processes)),
            ("file_mib", self.file_mib),
            ("disk_mib", self.disk_mib),
            ("inodes", self.inodes),
            ("output_kib", self.output_kib),
        ] {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if self.memory_mib < 8 {
            return Err("memory_mib must be at least 8".into());
        }
        Ok(())
    }
}

/// Limits as written: any subset.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialLimits {
    time_secs: Option<f64>,
    wall_secs: Option<f64>,
    memory_mib: Option<u64>,
    processes: Option<u32>,
    file_mib: Option<u64>,
    disk_mib: Option<u64>,
    inodes: Option<u64>,
    output_kib: Option<u64>,
}

/// `[sandbox]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// How boxes are built: `direct` (system calls of labrelay's own between fork and
    /// exec; the default) or `bwrap` (bubblewrap).
    pub launcher: String,
    /// The bubblewrap program (`launcher = "bwrap"`).
    pub bwrap: PathBuf,
    /// The unprivileged user and group the box runs as on the host.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Where the boxes' tmpfs mounts live on the host.
    pub dir: PathBuf,
    /// `auto` (v2 when it has the memory and pids controllers, else v1), `v1`, `v2`, or
    /// `none` (rlimits only: weaker, and reported so).
    pub cgroup: String,
    /// Where the cgroup file systems are mounted.
    pub cgroup_root: PathBuf,
    /// `PATH` inside the box.
    pub path: String,
    /// Read-only host paths bound into every box besides /usr (skipped when absent).
    pub binds: Vec<PathBuf>,
    /// Defaults of every language's run step.
    pub limits: PartialLimits,
    /// Defaults of every language's compile step.
    pub compile_limits: PartialLimits,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            launcher: "direct".into(),
            bwrap: "bwrap".into(),
            uid: 65534,
            gid: 65534,
            dir: "/run/labrelay-sandbox".into(),
            cgroup: "auto".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            binds: vec![
                "/etc/alternatives".into(),
                "/etc/ld.so.cache".into(),
                "/etc/ld.so.conf".into(),
                "/etc/ld.so.conf.d".into(),
                "/etc/localtime".into(),
            ],
            limits: PartialLimits::default(),
            compile_limits: PartialLimits::default(),
        }
    }
}

/// `remote = { ... }` of a language: run it on a remote engine instead of the local
/// sandbox — Piston-compatible (Piston's `POST /api/v2/execute`, or another labrelay's
/// `job-worker serve`) or Judge0-compatible (`POST /submissions`, Judge0 or another
/// labrelay's `job-worker serve`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `piston` (the default) or `judge0`: which API the engine speaks.
    #[serde(default = "default_api")]
    pub api: String,
    /// The endpoint: Piston's execute (`http://piston.lab:2000/api/v2/execute`) or
    /// Judge0's submissions (`http://judge0.lab:2358/submissions`).
    pub url: String,
    /// The engine's name of the language (Piston; default: the language's key).
    #[serde(default)]
    pub language: Option<String>,
    /// Judge0's id of the language (default: Judge0 CE's id of the language's key,
    /// [`judge0_id`]).
    #[serde(default)]
    pub language_id: Option<u32>,
    /// The engine's version of it (Piston: `*` takes the newest).
    #[serde(default = "default_version")]
    pub version: String,
    /// Sign requests as this `job-worker serve` user (with `key`); unsigned without.
    #[serde(default)]
    pub user: Option<String>,
    /// That user's key (`env:NAME`, `file:PATH`); with `api = "judge0"` and no `user`,
    /// Judge0's authentication token (sent as `X-Auth-Token`).
    #[serde(default)]
    pub key: Option<labrelay::secret::SecretSpec>,
    /// Give up on a request after this long (default: the limits' wall times + 30 s).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

fn default_version() -> String {
    "*".into()
}

fn default_api() -> String {
    "piston".into()
}

/// Judge0 CE's language ids of the shipped languages: the first of each is what labrelay
/// sends for a language without `language_id`; `job-worker serve` accepts them all.
pub const JUDGE0_LANGUAGES: &[(&str, &[u32])] = &[
    ("python", &[71, 92, 100]),
    ("bash", &[46]),
    ("c", &[50, 48, 49, 75]),
    ("cpp", &[54, 52, 53, 76]),
    ("java", &[62, 91]),
    ("javascript", &[63, 93]),
    ("go", &[60, 95]),
    ("csharp", &[51]),
    ("rust", &[73]),
    ("r", &[80]),
];

/// Judge0 CE's id of the language `key`.
pub fn judge0_id(key: &str) -> Option<u32> {
    JUDGE0_LANGUAGES
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, ids)| ids.first().copied())
}

/// The language key of Judge0's id `id`.
pub fn judge0_language(id: u32) -> Option<&'static str> {
    JUDGE0_LANGUAGES
        .iter()
        .find(|(_, ids)| ids.contains(&id))
        .map(|(k, _)| *k)
}

impl RemoteConfig {
    fn check(&self, key: &str) -> Result<(), String> {
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(_) => return Err(format!("`{}`: only http and https", self.url)),
            Err(e) => return Err(format!("`{}`: {e}", self.url)),
        }
        match self.api.as_str() {
            "piston" => {
                if self.user.is_some() != self.key.is_some() {
                    return Err("user and key go together".into());
                }
                if self.language_id.is_some() {
                    return Err("language_id is Judge0's (api = \"judge0\")".into());
                }
            }
            "judge0" => {
                if self.user.is_some() && self.key.is_none() {
                    return Err("user needs a key".into());
                }
                if self.language_id.is_none() && judge0_id(key).is_none() {
                    return Err(format!(
                        "language_id: Judge0 has no known id for `{key}`; give one"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "api = \"{other}\": expected \"piston\" or \"judge0\""
                ));
            }
        }
        Ok(())
    }

    /// Judge0's id of the language `key` on this engine.
    pub fn judge0_language_id(&self, key: &str) -> Option<u32> {
        self.language_id.or_else(|| judge0_id(key))
    }
}

/// `[languages.NAME]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLanguage {
    #[serde(default)]
    name: Option<String>,
    source: String,
    #[serde(default)]
    compile: Option<Vec<String>>,
    run: Vec<String>,
    #[serde(default)]
    binds: Vec<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    limits: PartialLimits,
    #[serde(default)]
    compile_limits: PartialLimits,
    #[serde(default)]
    remote: Option<RemoteConfig>,
}

/// One language, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Language {
    /// Its key, e.g. `python`.
    pub key: String,
    /// Shown by `code-submit languages`.
    pub name: String,
    /// The file the code is written to, in /box.
    pub source: String,
    /// Compile argv (run in /box), if the language compiles.
    pub compile: Option<Vec<String>>,
    /// Run argv (run in /box).
    pub run: Vec<String>,
    /// Extra read-only host paths.
    pub binds: Vec<PathBuf>,
    /// Extra environment variables inside the box.
    pub env: BTreeMap<String, String>,
    /// Default limits of the run step.
    pub limits: Limits,
    /// Limits of the compile step.
    pub compile_limits: Limits,
    /// Run on a remote engine instead of the local sandbox.
    #[serde(skip)]
    pub remote: Option<RemoteConfig>,
}

impl Language {
    /// The source file's extension (`py`, `c`, ...): submissions are stored as `ID.EXT`.
    pub fn extension(&self) -> &str {
        self.source.rsplit_once('.').map_or("txt", |(_, e)| e)
    }

    /// The program that must exist for the language to work here (the compiler, or the
    /// interpreter), found on `path` (the box's PATH).
    pub fn tool(&self) -> &str {
        self.compile
            .as_ref()
            .and_then(|c| c.first())
            .unwrap_or(&self.run[0])
    }

    /// Where the language's program is installed on this host, if it is (a remote
    /// language: its engine's URL).
    pub fn installed(&self, path: &str) -> Option<PathBuf> {
        if let Some(r) = &self.remote {
            return Some(PathBuf::from(&r.url));
        }
        find_program(self.tool(), path)
    }
}

/// `prog` as an absolute path, or found in the directories of `path`.
pub fn find_program(prog: &str, path: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return (p.is_absolute() && is_exec(&p)).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(prog))
        .find(|p| is_exec(p))
}

/// `[sandbox]` and every language, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[sandbox]`.
    pub sandbox: SandboxConfig,
    /// Languages by key: the shipped ones, with `[languages.NAME]` added or replacing.
    pub languages: BTreeMap<String, Language>,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A plain file name: no directory part, nothing hidden, nothing odd.
pub fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl Settings {
    /// Read `[sandbox]` and `[languages.NAME]` from `config`, over the shipped languages.
    pub fn from_config(config: &Config) -> Result<Settings, ConfigError> {
        let sandbox: SandboxConfig = config.section("sandbox")?.unwrap_or_default();
        let own: BTreeMap<String, RawLanguage> = config.section("languages")?.unwrap_or_default();
        Settings::build(sandbox, own)
    }

    /// The shipped languages with the default `[sandbox]`.
    pub fn shipped() -> Settings {
        Settings::build(SandboxConfig::default(), BTreeMap::new())
            .expect("the shipped languages are valid")
    }

    fn build(
        sandbox: SandboxConfig,
        own: BTreeMap<String, RawLanguage>,
    ) -> Result<Settings, ConfigError> {
        if !matches!(sandbox.launcher.as_str(), "direct" | "bwrap") {
            return Err(invalid(
                "sandbox.launcher",
                format!("`{}`: expected direct or bwrap", sandbox.launcher),
            ));
        }
        if !matches!(sandbox.cgroup.as_str(), "auto" | "v1" | "v2" | "none") {
            return Err(invalid(
                "sandbox.cgroup",
                format!("`{}`: expected auto, v1, v2 or none", sandbox.cgroup),
            ));
        }
        if sandbox.uid == 0 || sandbox.gid == 0 {
            return Err(invalid(
                "sandbox.uid",
                "the box must run as an unprivileged user and group, not 0",
            ));
        }
        if !sandbox.dir.is_absolute() {
            return Err(invalid("sandbox.dir", "must be an absolute path"));
        }
        for b in &sandbox.binds {
            check_bind("sandbox.binds", b)?;
        }
        let run_defaults = Limits::RUN.merge(&sandbox.limits);
        run_defaults
            .check()
            .map_err(|m| invalid("sandbox.limits", m))?;
        let compile_defaults = Limits::COMPILE.merge(&sandbox.compile_limits);
        compile_defaults
            .check()
            .map_err(|m| invalid("sandbox.compile_limits", m))?;
        let shipped: BTreeMap<String, RawLanguage> =
            toml::from_str(SHIPPED).map_err(|e| invalid("languages (shipped)", e.to_string()))?;
        let mut languages = BTreeMap::new();
        for (key, raw) in shipped.into_iter().chain(own) {
            let at = format!("languages.{key}");
            if !is_key(&key) {
                return Err(invalid(at, "a language key is 1-32 of a-z, 0-9, _ and -"));
            }
            if !is_plain_file_name(&raw.source) {
                return Err(invalid(
                    format!("{at}.source"),
                    format!("`{}` must be a plain file name", raw.source),
                ));
            }
            if raw.run.first().is_none_or(String::is_empty) {
                return Err(invalid(format!("{at}.run"), "needs a program"));
            }
            if raw
                .compile
                .as_ref()
                .is_some_and(|c| c.first().is_none_or(String::is_empty))
            {
                return Err(invalid(format!("{at}.compile"), "needs a program"));
            }
            for b in &raw.binds {
                check_bind(&format!("{at}.binds"), b)?;
            }
            for k in raw.env.keys() {
                if k.is_empty() || k.contains('=') || k == "PATH" {
                    return Err(invalid(
                        format!("{at}.env"),
                        format!("`{k}` cannot be set (PATH comes from [sandbox] path)"),
                    ));
                }
            }
            let limits = run_defaults.merge(&raw.limits);
            limits
                .check()
                .map_err(|m| invalid(format!("{at}.limits"), m))?;
            let compile_limits = compile_defaults.merge(&raw.compile_limits);
            compile_limits
                .check()
                .map_err(|m| invalid(format!("{at}.compile_limits"), m))?;
            if let Some(r) = &raw.remote {
                r.check(&key)
                    .map_err(|m| invalid(format!("{at}.remote"), m))?;
            }
            languages.insert(
                key.clone(),
                Language {
                    name: raw.name.unwrap_or_else(|| key.clone()),
                    key,
                    source: raw.source,
                    compile: raw.compile,
                    run: raw.run,
                    binds: raw.binds,
                    env: raw.env,
                    limits,
                    compile_limits,
                    remote: raw.remote,
                },
            );
        }
        Ok(Settings { sandbox, languages })
    }

    /// A language by key, or an error that lists the known ones.
    pub fn language(&self, key: &str) -> Result<&Language, String> {
        self.languages.get(key).ok_or_else(|| {
            format!(
                "no language `{key}` (known: {})",
                self.languages
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

fn check_bind(key: &str, p: &Path) -> Result<(), ConfigError> {
    let s = p.to_string_lossy();
    let forbidden = [
        "/", "/proc", "/sys", "/dev", "/box", "/tmp", "/run", "/root", "/home",
    ];
    if !p.is_absolute()
        || forbidden.contains(&s.trim_end_matches('/'))
        || s.split('/').any(|c| c == "..")
    {
        return Err(invalid(
            key,
            format!(
                "`{s}` cannot be bound into a box (absolute, no `..`, not /, /proc, /sys, /dev, /run, /tmp, /root, /home)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_languages_are_valid() {
        let s = Settings::shipped();
        for key in [
            "python",
            "bash",
            "c",
            "cpp",
            "java",
            "javascript",
            "go",
            "csharp",
            "rust",
            "r",
        ] {
            assert!(s.languages.contains_key(key), "{key}");
        }
        assert_eq!(s.languages["python"].extension(), "py");
        assert_eq!(s.languages["c"].tool(), "gcc");
    }

    #[test]
    fn bad_entries_name_their_key() {
        let cfg =
            Config::from_toml("[languages.x]\nsource = \"../evil\"\nrun = [\"x\"]\n").unwrap();
        let e = Settings::from_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("languages.x.source"), "{e}");
        let cfg = Config::from_toml("[sandbox]\nbinds = [\"/root\"]\n").unwrap();
        let e = Settings::from_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("sandbox.binds"), "{e}");
        let cfg = Config::from_toml("[sandbox]\nuid = 0\n").unwrap();
        assert!(Settings::from_config(&cfg).is_err());
        let cfg = Config::from_toml("[sandbox.limits]\nmemory_mib = 0\n").unwrap();
        let e = Settings::from_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("memory_mib"), "{e}");
        let cfg = Config::from_toml("[sandbox]\nlauncher = \"chroot\"\n").unwrap();
        let e = Settings::from_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("sandbox.launcher"), "{e}");
        for (remote, says) in [
            (
                "api = \"grpc\", url = \"http://e/x\"",
                "expected \"piston\" or \"judge0\"",
            ),
            (
                "api = \"judge0\", url = \"http://e/submissions\"",
                "no known id for `x`",
            ),
            (
                "url = \"http://e/x\", language_id = 71",
                "language_id is Judge0's",
            ),
            (
                "api = \"judge0\", url = \"http://e/s\", language_id = 71, user = \"u\"",
                "user needs a key",
            ),
        ] {
            let cfg = Config::from_toml(&format!(
                "[languages.x]\nsource = \"main.x\"\nrun = [\"x\"]\nremote = {{ {remote} }}\n"
            ))
            .unwrap();
            let e = Settings::from_config(&cfg).unwrap_err().to_string();
            assert!(
                e.contains("languages.x.remote") && e.contains(says),
                "{remote}: {e}"
            );
        }
        // Judge0 with a known key, or with a token only: fine.
        let cfg = Config::from_toml(
            "[languages.python]\nsource = \"main.py\"\nrun = [\"python3\"]\n\
             remote = { api = \"judge0\", url = \"http://e/submissions\", key = \"env:T\" }\n",
        )
        .unwrap();
        let s = Settings::from_config(&cfg).unwrap();
        let r = s.language("python").unwrap().remote.clone().unwrap();
        assert_eq!(r.judge0_language_id("python"), Some(71));
        assert_eq!(judge0_language(50), Some("c"));
    }
}
