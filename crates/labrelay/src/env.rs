//! Every environment variable labrelay reads, as a documented constant.
//!
//! docs/configuration.md lists the same table; a test checks the two agree.

/// Path of a config file to load on top of the system and user files (same as `--config`).
pub const LABRELAY_CONFIG: &str = "LABRELAY_CONFIG";
/// When set to `1`/`true`, load no config file at all (same as `--no-config`).
pub const LABRELAY_NO_CONFIG: &str = "LABRELAY_NO_CONFIG";
/// Overrides the system-wide config file path (default `/etc/labrelay/config.toml`).
pub const LABRELAY_SYSTEM_CONFIG: &str = "LABRELAY_SYSTEM_CONFIG";
/// Overrides `[paths] data_dir`: where state, the embedded queue, locks and the outbox live.
pub const LABRELAY_DATA_DIR: &str = "LABRELAY_DATA_DIR";
/// Overrides `[queue] url`.
pub const LABRELAY_QUEUE_URL: &str = "LABRELAY_QUEUE_URL";
/// Overrides `[state] url`: the database holding labrelay's own state tables.
pub const LABRELAY_STATE_URL: &str = "LABRELAY_STATE_URL";
/// A tracing filter (e.g. `labrelay=debug`); overrides `-v`/`-q`. `RUST_LOG` is read too.
pub const LABRELAY_LOG: &str = "LABRELAY_LOG";
/// Standard tracing filter variable, used when `LABRELAY_LOG` is unset.
pub const RUST_LOG: &str = "RUST_LOG";
/// When set (any value), never draw progress bars.
pub const LABRELAY_NO_PROGRESS: &str = "LABRELAY_NO_PROGRESS";
/// <https://no-color.org>: when set to a non-empty value, no colour on stderr.
pub const NO_COLOR: &str = "NO_COLOR";
/// Base of the user config directory (default `~/.config`).
pub const XDG_CONFIG_HOME: &str = "XDG_CONFIG_HOME";
/// Base of the user data directory (default `~/.local/share`).
pub const XDG_DATA_HOME: &str = "XDG_DATA_HOME";
/// The user's home directory, for the XDG defaults.
pub const HOME: &str = "HOME";

/// All variables above, for documentation checks.
pub const ALL: &[&str] = &[
    LABRELAY_CONFIG,
    LABRELAY_NO_CONFIG,
    LABRELAY_SYSTEM_CONFIG,
    LABRELAY_DATA_DIR,
    LABRELAY_QUEUE_URL,
    LABRELAY_STATE_URL,
    LABRELAY_LOG,
    RUST_LOG,
    LABRELAY_NO_PROGRESS,
    NO_COLOR,
    XDG_CONFIG_HOME,
    XDG_DATA_HOME,
    HOME,
];

/// Read a variable as a non-empty string.
pub fn get(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Read a variable as a boolean flag (`1`, `true`, `yes`, `on`).
pub fn flag(name: &str) -> bool {
    get(name)
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}
