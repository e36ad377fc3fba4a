mod catalog;
mod error;
mod planner;
mod settings;
mod sizing;
mod version;
fn main() {}
