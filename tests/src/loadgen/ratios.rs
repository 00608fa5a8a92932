//! Figures that compare systems measured in the same run (the ratio the idle target is
//! stated in: Herald's RSS per idle connection over the peers'), added to Herald's outcome once
//! every system has run. Ratios come from one run only, as docs/BENCHMARKS.md asks.

use serde_json::Value;

use super::scenarios::{round, Outcome, Scenario, System};

/// The idle figure compared across systems.
const IDLE_RSS: &str = "rss_per_connection_kib";

/// Adds `herald_to_<system>_rss_per_connection` to each idle Herald outcome, for every other
/// system with an idle outcome in `outcomes`.
pub(crate) fn add_idle_ratios(outcomes: &mut [Outcome]) {
    let others: Vec<(System, f64)> = outcomes
        .iter()
        .filter(|o| o.scenario == Scenario::Idle && o.system != System::Herald)
        .filter_map(|o| Some((o.system, figure(o, IDLE_RSS)?)))
        .collect();
    for herald in outcomes.iter_mut().filter(|o| o.scenario == Scenario::Idle && o.system == System::Herald) {
        let Some(mine) = figure(herald, IDLE_RSS) else { continue };
        for (system, theirs) in &others {
            let name = format!("herald_to_{}_rss_per_connection", system_name(*system));
            herald.set(&name, (*theirs > 0.0).then(|| round(mine / theirs, 2)));
        }
    }
}

fn figure(outcome: &Outcome, name: &str) -> Option<f64> {
    outcome.figures.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_f64())
}

/// The system's name as the command line spells it.
fn system_name(system: System) -> String {
    match serde_json::to_value(system) {
        Ok(Value::String(name)) => name,
        _ => format!("{system:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(system: System, rss: f64) -> Outcome {
        let mut o = Outcome::new(Scenario::Idle, system);
        o.set(IDLE_RSS, rss);
        o
    }

    #[test]
    fn herald_gets_a_ratio_to_each_other_idle_system() {
        let mut outcomes = vec![idle(System::Herald, 5.5), idle(System::Peer, 11.0), idle(System::Ws, 10.0)];
        add_idle_ratios(&mut outcomes);
        assert_eq!(figure(&outcomes[0], "herald_to_peer_rss_per_connection"), Some(0.5));
        assert_eq!(figure(&outcomes[0], "herald_to_ws_rss_per_connection"), Some(0.55));
        assert_eq!(outcomes[1].figures.len(), 1, "only Herald's outcome gets ratios");
    }

    #[test]
    fn no_ratio_without_herald_or_a_usable_figure() {
        let mut outcomes = vec![idle(System::Ws, 10.0)];
        add_idle_ratios(&mut outcomes);
        assert_eq!(outcomes[0].figures.len(), 1);
        let mut outcomes = vec![idle(System::Herald, 5.0), idle(System::Ws, 0.0)];
        add_idle_ratios(&mut outcomes);
        assert_eq!(outcomes[0].figures.last().map(|(_, v)| v.is_null()), Some(true), "no ratio to a zero");
    }
}
