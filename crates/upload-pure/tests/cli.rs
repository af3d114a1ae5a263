//! Command-line contract of `upload-pure`: help text, usage and configuration errors.

const BIN: &str = env!("CARGO_BIN_EXE_upload-pure");
const VALID: &[&str] = &["--project-id", "P", "--analysis-path", "/tmp"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}

#[test]
fn delivers_a_folder_given_by_path_and_mails_the_projects_contacts() {
    let home = test_support::tempdir();
    let h = home.path();
    let folder = h.join("analysis/6cLB4ma/result/upload");
    std::fs::create_dir_all(folder.join("clean")).unwrap();
    std::fs::write(folder.join("clean/S1.fq"), "@r\nACGT\n+\nIIII\n").unwrap();
    std::fs::write(folder.join("empty.txt"), "").unwrap();
    std::fs::create_dir_all(h.join("out")).unwrap();
    let cfg = test_support::write_config(
        h,
        &format!(
            r#"[paths]
data_dir = "{data}"
[mail]
from = "Delivery <delivery@labrelay.test>"
[storage.nas]
url = "{out}"
[delivery.project_lookup]
command = ["/bin/echo", '{{"customer_email": "c@labrelay.test", "action_email": "a@labrelay.test"}}']
"#,
            data = h.join("data").display(),
            out = h.join("out").display()
        ),
    );
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "-p",
        "V3fmjM",
        "-a",
        folder.to_str().unwrap(),
        "--name",
        "6cLB4ma",
        "--json",
    ];
    let out = test_support::cli::run(BIN, h, &args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(summary["status"], "delivered", "{text}");
    assert_eq!(summary["project_id"], "V3fmjM");
    let md5sum = std::fs::read_to_string(h.join("out/6cLB4ma/md5sum.txt")).unwrap();
    assert_eq!(
        md5sum,
        "6f952306024120c74b2d750637241e24  clean/S1.fq\nd41d8cd98f00b204e9800998ecf8427e  empty.txt\n"
    );
    let outbox: Vec<_> = std::fs::read_dir(h.join("data/outbox")).unwrap().collect();
    assert_eq!(outbox.len(), 1);

    // A missing folder is a clear failure (exit 1) naming it.
    let mut bad = args;
    bad[5] = "/nonexistent/folder";
    let out = test_support::cli::run(BIN, h, &bad);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/folder"));
}
