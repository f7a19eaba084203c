//! Test support shared by the membus crates' integration tests. Not published; only ever a
//! dev-dependency.
