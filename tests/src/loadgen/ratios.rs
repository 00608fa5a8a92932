//! Figures that compare systems measured in the same run (the ratio the idle target is
//! stated in: Herald's RSS per idle connection over the peers'; and Herald's gateways' CPU per
//! delivery over the bare server's), added to Herald's outcome once every system has run. Ratios
//! come from one run only, as docs/BENCHMARKS.md asks.

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

/// Adds `r<n>_gateways_to_limit_cpu_per_delivery` to the cost scenario's Herald outcome for each
/// recipient count `n` the limit was measured at too: how Herald's gateways compare with a
/// server that only writes the frames and reads the acks.
pub(crate) fn add_cost_ratios(outcomes: &mut [Outcome]) {
    let is_cost = |o: &&Outcome, system| o.scenario == Scenario::Cost && o.system == system;
    let Some(limit) = outcomes.iter().find(|o| is_cost(o, System::Limit)).cloned() else { return };
    for herald in outcomes.iter_mut().filter(|o| o.scenario == Scenario::Cost && o.system == System::Herald) {
        let windows: Vec<String> =
            herald.figures.iter().filter_map(|(name, _)| name.strip_suffix(COST_GATEWAYS).map(str::to_owned)).collect();
        for window in windows {
            let (Some(mine), Some(theirs)) =
                (figure(herald, &format!("{window}{COST_GATEWAYS}")), figure(&limit, &format!("{window}{COST_LIMIT}")))
            else {
                continue;
            };
            let name = format!("{window}gateways_to_limit_cpu_per_delivery");
            herald.set(&name, (theirs > 0.0).then(|| round(mine / theirs, 2)));
        }
    }
}

/// The cost figures compared, after each window's `r<n>_`.
const COST_GATEWAYS: &str = "gateways_cpu_us_per_delivery";
const COST_LIMIT: &str = "limit_cpu_us_per_delivery";

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
    fn herald_gets_its_gateways_ratio_to_the_limit_for_each_window_both_measured() {
        let mut herald = Outcome::new(Scenario::Cost, System::Herald);
        herald.set("r1_gateways_cpu_us_per_delivery", 44.0);
        herald.set("r10_gateways_cpu_us_per_delivery", 30.0);
        let mut limit = Outcome::new(Scenario::Cost, System::Limit);
        limit.set("r1_limit_cpu_us_per_delivery", 40.0);
        let mut outcomes = vec![herald, limit];
        add_cost_ratios(&mut outcomes);
        assert_eq!(figure(&outcomes[0], "r1_gateways_to_limit_cpu_per_delivery"), Some(1.1));
        assert_eq!(figure(&outcomes[0], "r10_gateways_to_limit_cpu_per_delivery"), None, "no limit figure at 10");
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
