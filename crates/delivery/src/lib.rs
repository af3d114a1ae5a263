//! The delivery engine shared by `delivery-upload` and `upload-pure`: look up an
//! analysis and its contacts, build a manifest, upload with resume, verify, grant the
//! customer access, mail, and record the delivery.
//!
//! Module map (data flows top to bottom):
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the `[delivery]` section |
//! | [`template`] | the template engine: mail templates and argv templates |
//! | [`command`] | the runner of external programs (vendor steps, access and lookup commands) |
//! | [`lookup`], [`sql`] | analysis id / project id → folder, project, contacts |
//! | [`manifest`] | walking the folder: globs, symlinks, problems, keys, checksum lines |
//! | [`upload`] | parallel upload, multipart with journal, verification |
//! | [`state`] | status rows and the resume journal in the state database |
//! | [`report`] | the types handed to customer access and mail, and their trait |
//! | [`access`], [`notify`], [`vendor`] | customer access, the delivery mails, vendor CLI targets |
//! | [`steps`] | the customer steps as the tools run them: access, then mail |
//! | [`run`] | one delivery end to end, one method per stage |
//! | [`listen`] | the queue consumer |
//! | [`events`] | JSON Lines records and progress |
#![deny(missing_docs)]

pub mod access;
pub mod command;
pub mod config;
pub mod error;
pub mod events;
pub mod listen;
pub mod lookup;
pub mod manifest;
pub mod notify;
pub mod report;
pub mod run;
pub mod sql;
pub mod state;
pub mod steps;
pub mod template;
pub mod upload;
pub mod vendor;
