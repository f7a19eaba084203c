//! End-to-end tests: a real `bus-broker` process on a temporary socket, clients in this process
//! (threads) and in child processes (this test binary, re-executed).

mod harness;
mod lifecycle;
mod mixed;
mod pubsub;

/// Entry point of child processes: does nothing unless `MEMBUS_IT_CHILD` names a role.
#[test]
fn child_entry() {
    harness::run_child_role();
}
