//! `cargo run -p benches --release -- CASE`: the membus benchmark harness.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("no benchmark cases yet")
}
