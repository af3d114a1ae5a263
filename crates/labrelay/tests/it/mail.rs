//! mail tests.
