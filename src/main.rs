mod catalog;
mod error;
mod planner;
mod render;
mod settings;
mod sizing;
mod state;
mod version;
fn main() {}
