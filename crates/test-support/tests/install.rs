//! `scripts/install` into a temporary prefix: every tool, its man page and completion
//! scripts, and the example config, which a second install must not overwrite.
//!
//! The script runs with `--debug`, which installs the debug binaries cargo already built
//! for this test run (a release build would take many minutes) and otherwise takes the
//! same path as a release install. Run it with the rest of the workspace
//! (`cargo nextest run --workspace`), which builds every tool binary first.

// The whole file is a test: a panic with the value is the clearest failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOOLS: [&str; 6] = [
    "delivery-upload",
    "upload-pure",
    "mail-query",
    "sync-publish",
    "code-submit",
    "job-worker",
];

/// This checkout's root, from this test's own build (the `test_support` library may be
/// a build shared with another checkout of the workspace, whose root it would name).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The target dir this test binary was built into (`<target>/debug/deps/install-…`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    assert_eq!(
        profile_dir.file_name().and_then(|n| n.to_str()),
        Some("debug"),
        "expected the test binary under <target>/debug/deps: {}",
        exe.display()
    );
    profile_dir.parent().unwrap().to_path_buf()
}

fn install(prefix: &Path, home: &Path) -> Output {
    let target = target_dir();
    for tool in TOOLS {
        let bin = target.join("debug").join(tool);
        assert!(
            bin.exists(),
            "{} is not built; run the workspace's tests (cargo nextest run --workspace) \
             or `cargo build --bins` first",
            bin.display()
        );
    }
    let mut cmd = Command::new(root().join("scripts/install"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LABRELAY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(["--debug".as_ref(), prefix.as_os_str()])
        .env("CARGO_TARGET_DIR", &target)
        .env("HOME", home)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "scripts/install failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn install_puts_tools_man_pages_completions_and_config_into_a_prefix() {
    let tmp = test_support::tempdir();
    let prefix = tmp.path().join("prefix");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    install(&prefix, &home);

    for tool in TOOLS {
        let bin = prefix.join("bin").join(tool);
        let bin = bin.to_str().unwrap();

        let out = test_support::cli::run(bin, &home, &["--version"]);
        assert_eq!(out.status.code(), Some(0), "{tool} --version: {out:?}");
        let version = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            version.trim(),
            format!("{tool} {}", env!("CARGO_PKG_VERSION")),
            "{tool}"
        );

        // No config file and no server is needed for the man page.
        let out = test_support::cli::run(bin, &home, &["man"]);
        assert_eq!(out.status.code(), Some(0), "{tool} man: {out:?}");
        assert!(out.stderr.is_empty(), "{tool} man wrote to stderr: {out:?}");
        let page = String::from_utf8(out.stdout).unwrap();
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!(".TH {tool} 1 "))),
            "{tool} man is not a man page:\n{page}"
        );
        assert!(page.contains("EXIT STATUS"), "{tool}:\n{page}");
        let man1 = prefix.join("share/man/man1");
        let installed = man1.join(format!("{tool}.1"));
        assert_eq!(read(&installed), page, "{}", installed.display());
        // Every page a SUBCOMMANDS section refers to (`code\-submit\-man(1)`) is there.
        let mut pages = vec![page];
        let mut seen = 0;
        while let Some(page) = pages.pop() {
            for line in page
                .lines()
                .filter(|l| l.ends_with("(1)") && !l.contains(' '))
            {
                let name = line.trim_end_matches("(1)").replace("\\-", "-");
                let path = man1.join(format!("{name}.1"));
                assert!(
                    path.exists(),
                    "{tool}: {name}(1) is referred to but not installed"
                );
                pages.push(read(&path));
                seen += 1;
            }
        }
        // At least the pages of `completions` and `man`.
        assert!(seen >= 2, "{tool}: {seen} subcommand pages");

        for script in [
            format!("share/bash-completion/completions/{tool}"),
            format!("share/zsh/site-functions/_{tool}"),
            format!("share/fish/vendor_completions.d/{tool}.fish"),
        ] {
            let text = read(&prefix.join(&script));
            assert!(
                text.contains(tool),
                "{script} does not complete {tool}:\n{text}"
            );
        }
    }

    let example = read(&root().join("examples/config.toml"));
    let config = prefix.join("etc/labrelay/config.toml");
    assert_eq!(read(&config), example);
    assert_eq!(
        read(&prefix.join("share/doc/labrelay/config.example.toml")),
        example
    );

    // Installing again (an upgrade) keeps the administrator's config.
    std::fs::write(&config, "# ours\n").unwrap();
    let out = install(&prefix, &home);
    assert_eq!(read(&config), "# ours\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kept the existing"),
        "{out:?}"
    );
    assert_eq!(
        read(&prefix.join("share/doc/labrelay/config.example.toml")),
        example
    );
    assert!(prefix.join("bin/job-worker").exists());
}
