//! bus-core integration tests: one binary, one module per area.

mod deps;
mod frame;
mod ring;
mod scm;
mod segment;
