//! ssh tests.
