//! Runs the race lab (every scenario, naive then racefree, on the lab's own workloads) and
//! asserts that every racefree row holds what it must. The naive rows are the lab's business:
//! they show the race, and are not asserted here.

#[path = "../examples/race_lab/lab.rs"]
mod lab;

#[test]
fn every_racefree_row_holds() {
    for scenario in lab::SCENARIOS {
        let row = scenario.run();
        assert!(
            row.racefree.holds,
            "{} with {} callers must hold \"{}\", but racefree observed: {}",
            row.scenario, row.callers, row.must_hold, row.racefree.observed
        );
    }
}
