//! The Sourcegraph stack on a running box (docker compose): readiness, the first site admin, the
//! lease that keeps one upgrade at a time, the upgrade journal, and the upgrade and rollback engine that the journal drives. Everything here reaches the box only
//! through [`crate::onbox::Session`].

pub mod journal;
pub mod lease;
pub mod readiness;
pub mod site;
pub mod upgrade;
