//! The errors of a delivery that are not a library's: a missing target, an analysis
//! path outside the data roots, files that failed, a target that does not hold the
//! delivery. Each has its exit class ([`labrelay::exit::ExitClass`]), so the exit path
//! maps it without any string tagging; errors from libraries (storage, mail, SQL,
//! commands) travel as themselves, with their own classes.

use std::path::PathBuf;

use labrelay::Exit;
use labrelay::exit::ExitClass;

/// Why a delivery (or `links`, `renew`, `request`) cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// No `[storage.*]` section at all (78).
    #[error(
        "no delivery target: add a [storage.NAME] section (a local directory, s3:// or \
         sftp:// url) and pass --target NAME"
    )]
    NoTarget,
    /// Several storage sections and none chosen (78).
    #[error("several [storage.*] sections ({names}): pass --target NAME or set [delivery] target")]
    AmbiguousTarget {
        /// The section names, comma-separated.
        names: String,
    },
    /// `--target NAME` without a section (78).
    #[error("no [storage.{0}] section for target {0}")]
    UnknownTarget(String),
    /// A configuration section a command needs is absent (78).
    #[error("{needs} needs {section}")]
    MissingSection {
        /// Who needs it: "delivery-upload", "renew".
        needs: &'static str,
        /// The section and what it must hold.
        section: &'static str,
    },
    /// A lookup section without `sql` or `command` (78).
    #[error("[{0}] needs sql or command")]
    LookupWithoutSource(&'static str),
    /// A bad `[delivery] include`/`exclude` pattern (78).
    #[error("{0}")]
    Filter(String),
    /// A target with neither storage nor command (78).
    #[error("the target has neither storage nor command")]
    EmptyTarget,
    /// `links`/`renew` on a target whose customers get no presigned links (78).
    #[error(
        "target {target} gives access by {method}, not by presigned links; there are no links \
         to renew"
    )]
    NoLinks {
        /// The target.
        target: String,
        /// Its access method.
        method: String,
    },
    /// An SFTP target without a way to give the customer access (78).
    #[error(
        "[storage.{0}] is an SFTP target, but [delivery.access] has no command to create the \
         customer's account there: configure [delivery.access.command], or set \
         [delivery.access] methods = {{ {0} = \"none\" }} if customers log in with accounts \
         of their own"
    )]
    SftpWithoutAccess(String),
    /// The LIMS row has no analysis path (1).
    #[error("analysis {0} has no analysis_path in the LIMS")]
    NoAnalysisPath(String),
    /// The LIMS row's analysis path is relative (1).
    #[error(
        "the LIMS row of analysis {id} has a relative analysis_path {path:?}; it must be absolute"
    )]
    RelativeAnalysisPath {
        /// The analysis.
        id: String,
        /// The path as the LIMS gave it.
        path: String,
    },
    /// The analysis path resolves outside `[delivery] data_roots`, or into /proc,
    /// /sys or /dev (1).
    #[error(
        "analysis path {} ({}) is outside [delivery] data_roots ({roots}); nothing there is \
         delivered",
        path.display(),
        real.display()
    )]
    OutsideDataRoots {
        /// The path as given.
        path: PathBuf,
        /// Where it resolves to.
        real: PathBuf,
        /// The configured roots, comma-separated.
        roots: String,
    },
    /// The analysis path is a file, not a folder (1).
    #[error("analysis path {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The analysis path cannot be read (1).
    #[error("analysis path {} cannot be read", path.display())]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Walking the delivery folder failed (1).
    #[error("cannot read the delivery folder {0}")]
    Walk(String),
    /// Files that cannot be delivered (links out of bounds, special files) (1).
    #[error(
        "{count} file(s) in {} cannot be delivered, nothing was uploaded (first: {first})",
        path.display()
    )]
    Problems {
        /// How many.
        count: usize,
        /// The folder.
        path: PathBuf,
        /// The first problem.
        first: String,
    },
    /// The filters left nothing (1).
    #[error("nothing to deliver in {} (check [delivery] include/exclude)", .0.display())]
    NothingToDeliver(PathBuf),
    /// The lookup found nothing (1).
    #[error("{what} not found by [{section}]")]
    NotFound {
        /// "analysis A1", "project P1".
        what: String,
        /// The lookup section.
        section: &'static str,
    },
    /// A lookup command printed something that is not the expected JSON (1).
    #[error("lookup command {program}: {message}")]
    LookupOutput {
        /// The program.
        program: String,
        /// What is wrong with its output.
        message: String,
    },
    /// A vendor target needs a project id the LIMS does not have (1).
    #[error("analysis {0} has no project_id; the vendor target needs one")]
    NoProjectId(String),
    /// Some files failed to upload; `class` is 75 when every failure was temporary (1/75).
    #[error("{failed} of {files} files failed (first: {first}: {reason}); run again to retry them")]
    FilesFailed {
        /// Files that failed.
        failed: usize,
        /// Files in the delivery.
        files: u64,
        /// The first failed file.
        first: String,
        /// Why it failed.
        reason: String,
        /// 75 when all failures were temporary, else 1.
        class: Exit,
    },
    /// The target's listing differs from the manifest (1).
    #[error(
        "the target {target} does not hold exactly this delivery below {prefix}/: {what}; the \
         customer was not told"
    )]
    TargetMismatch {
        /// The target.
        target: String,
        /// The delivery prefix.
        prefix: String,
        /// What is missing or extra.
        what: String,
    },
    /// No customer address in the LIMS (1).
    #[error(
        "analysis {0} has no customer e-mail address in the LIMS: the data is uploaded but the \
         customer was not told (fix the address and run again)"
    )]
    NoCustomerAddress(String),
    /// `links`/`renew` before any delivery (1).
    #[error("{id} has no finished delivery to {target}; deliver it first")]
    NoFinishedDelivery {
        /// The analysis.
        id: String,
        /// The target.
        target: String,
    },
    /// `links` after the links expired (1).
    #[error(
        "the links of {id} expired on {expired}; `delivery-upload renew --analysis-id {id}` \
         issues new ones"
    )]
    LinksExpired {
        /// The analysis.
        id: String,
        /// When, for people.
        expired: String,
    },
    /// A delivered file is no longer on the target (1).
    #[error("{key} is no longer on {target}")]
    Gone {
        /// The key.
        key: String,
        /// The target.
        target: String,
    },
    /// A second Ctrl-C (75).
    #[error("interrupted twice; stopped at once (run again to resume)")]
    InterruptedTwice,
}

impl ExitClass for DeliveryError {
    fn exit_class(&self) -> Exit {
        use DeliveryError as E;
        match self {
            E::NoTarget
            | E::AmbiguousTarget { .. }
            | E::UnknownTarget(_)
            | E::MissingSection { .. }
            | E::LookupWithoutSource(_)
            | E::Filter(_)
            | E::EmptyTarget
            | E::NoLinks { .. }
            | E::SftpWithoutAccess(_) => Exit::Config,
            E::FilesFailed { class, .. } => *class,
            E::InterruptedTwice => Exit::TempFail,
            E::NoAnalysisPath(_)
            | E::RelativeAnalysisPath { .. }
            | E::OutsideDataRoots { .. }
            | E::NotADirectory(_)
            | E::Unreadable { .. }
            | E::Walk(_)
            | E::Problems { .. }
            | E::NothingToDeliver(_)
            | E::NotFound { .. }
            | E::LookupOutput { .. }
            | E::NoProjectId(_)
            | E::TargetMismatch { .. }
            | E::NoCustomerAddress(_)
            | E::NoFinishedDelivery { .. }
            | E::LinksExpired { .. }
            | E::Gone { .. } => Exit::Failed,
        }
    }

    // Files that failed temporarily were retried already, file by file.
    fn is_transient(&self) -> bool {
        false
    }
}
labrelay::exit_class!(DeliveryError);

#[cfg(test)]
mod tests {
    use labrelay::exit::classify;

    use super::*;

    #[test]
    fn every_error_of_the_crate_maps_to_its_documented_class() {
        let cases: Vec<(anyhow::Error, Exit)> = vec![
            (DeliveryError::NoTarget.into(), Exit::Config),
            (
                DeliveryError::UnknownTarget("x".into()).into(),
                Exit::Config,
            ),
            (
                DeliveryError::NoAnalysisPath("A1".into()).into(),
                Exit::Failed,
            ),
            (DeliveryError::InterruptedTwice.into(), Exit::TempFail),
            (
                DeliveryError::FilesFailed {
                    failed: 1,
                    files: 2,
                    first: "a".into(),
                    reason: "b".into(),
                    class: Exit::TempFail,
                }
                .into(),
                Exit::TempFail,
            ),
            (
                crate::sql::SqlError::UnknownParameter {
                    what: "[delivery.status] sql".into(),
                    name: "x".into(),
                    available: "analysis_id".into(),
                }
                .into(),
                Exit::Config,
            ),
        ];
        for (err, want) in cases {
            let err = err.context("delivering A1");
            assert_eq!(classify(&err), want, "{err:#}");
        }
    }

    #[test]
    fn the_source_chain_is_kept() {
        let err = anyhow::Error::new(DeliveryError::Unreadable {
            path: "/data/A1".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        let text = format!("{err:#}");
        assert!(
            text.starts_with("analysis path /data/A1 cannot be read: "),
            "{text}"
        );
        assert!(
            err.chain()
                .any(|e| e.downcast_ref::<std::io::Error>().is_some())
        );
    }
}
