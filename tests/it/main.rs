//! sgbox's integration tests, in one test binary: the harness (`common`) is built once, and
//! plain `cargo test` runs the fast ones (the command line, AWS against moto, the validators) in
//! a few minutes. The end-to-end test on a real QEMU box takes 20 minutes or more and is marked
//! `#[ignore]` so that `cargo test` stays quick; the README's test command (`.ci/test`) runs it
//! too (`--include-ignored`), and it fails loudly when a tool it needs is missing.

mod common;

mod aws;
mod cli;
mod local_box;
mod validators;
mod wizard;
