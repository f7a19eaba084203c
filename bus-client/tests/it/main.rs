//! End-to-end tests: a real `bus-broker` process on a temporary socket, clients in this process
//! (threads) and in child processes (this test binary, re-executed).

mod harness;
mod lifecycle;
mod mixed;
mod pubsub;

/// Entry point of child processes, not a test of its own: the tests re-execute this binary
/// with `--ignored --exact child_entry` and `MEMBUS_IT_CHILD` naming a role. Ignored, so that a
/// normal run lists it as skipped instead of counting an empty pass; run by hand without a role
/// it fails, saying so.
#[test]
#[ignore = "child-process entry point, run by the other tests with MEMBUS_IT_CHILD set"]
fn child_entry() {
    harness::run_child_role();
}
