//! Architecture invariant: dependencies point one way, `bus-client -> bus-core <- bus-broker`.
//! Only the `bus` CLI may depend on bus-broker, and only bus-broker (and what embeds it) may
//! pull in io-uring. Checked from `cargo metadata`, so the rule cannot rot.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

struct Graph {
    /// package name -> names of its normal (non-dev) dependencies, resolved.
    edges: BTreeMap<String, BTreeSet<String>>,
    members: BTreeSet<String>,
}

fn graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path", root])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let name_of: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let members = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| name_of[id.as_str().unwrap()].clone())
        .collect();
    let mut edges = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let from = name_of[node["id"].as_str().unwrap()].clone();
        let deps: BTreeSet<String> = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
            .map(|d| name_of[d["pkg"].as_str().unwrap()].clone())
            .collect();
        edges.entry(from).or_insert_with(BTreeSet::new).extend(deps);
    }
    Graph { edges, members }
}

impl Graph {
    fn closure(&self, from: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(p) = stack.pop() {
            for d in self.edges.get(&p).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    }
}

#[test]
fn dependencies_point_one_way() {
    let g = graph();
    for required in ["bus-core", "bus-broker", "bus-client", "bus-cli", "benches"] {
        assert!(
            g.members.contains(required),
            "workspace lost {required}: {:?}",
            g.members
        );
    }
    let core = g.closure("bus-core");
    let internal: Vec<_> = core.intersection(&g.members).collect();
    assert!(
        internal.is_empty(),
        "bus-core must depend on no workspace crate, has {internal:?}"
    );

    for lib in ["bus-client", "bus-broker"] {
        let deps = g.closure(lib);
        let internal: BTreeSet<_> = deps.intersection(&g.members).cloned().collect();
        assert!(
            internal.iter().all(|d| d == "bus-core"),
            "{lib} may depend only on bus-core among workspace crates, has {internal:?}"
        );
    }
    for member in &g.members {
        if member != "bus-cli" {
            assert!(
                !g.closure(member).contains("bus-broker"),
                "{member} depends on bus-broker: only the bus CLI may embed the broker"
            );
        }
    }
}

#[test]
fn only_the_broker_uses_io_uring() {
    let g = graph();
    for member in &g.members {
        let uses = g.closure(member).contains("io-uring");
        let embeds_broker = member == "bus-broker" || g.closure(member).contains("bus-broker");
        // The benchmark harness measures an io_uring wait itself, as a raw floor.
        let measures_it = member == "benches";
        assert!(
            !uses || embeds_broker || measures_it,
            "{member} pulls in io-uring without going through bus-broker"
        );
    }
}

/// The shipped `bus` carries no benchmark harness (and so no counting allocator, and no
/// io-uring except through the broker it embeds) unless built with its `bench` feature.
#[test]
fn the_bus_command_carries_no_benchmark_harness() {
    let g = graph();
    let deps = g.closure("bus-cli");
    assert!(
        !deps.contains("benches"),
        "bus-cli pulls in the benchmark harness by default: keep it behind the `bench` feature"
    );
    assert!(deps.contains("bus-broker") && deps.contains("bus-client"));
}
