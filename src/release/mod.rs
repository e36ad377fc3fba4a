//! What Sourcegraph ships and how to move between releases, all pure: the release catalog
//! (`catalog`), version parsing (`version`), the upgrade planner (`planner`), machine sizes
//! (`sizing`) and AWS prices (`pricing`). Nothing here does I/O beyond reading embedded data.

pub mod catalog;
pub mod planner;
pub mod pricing;
pub mod sizing;
pub mod version;
