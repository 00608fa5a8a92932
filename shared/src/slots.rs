//! Multi-key commands that stay valid on a Redis Cluster, where every key of one command must
//! hash to one slot (else CROSSSLOT). Owns how keys are grouped into such commands; what the
//! commands are, and what their replies mean, stays with the caller.
//!
//! Single-key commands need nothing: fred's pipelines on a clustered client send each command
//! to the node owning its key and answer in the order the commands were queued.

use std::collections::BTreeMap;

/// Groups of indices into `keys`, each group at most `max` long, for one multi-key command each
/// (`EXISTS`, `MGET`). Every index appears once, and indices keep their order within a group.
///
/// Centralized (a single server, or the master a Sentinel names): any keys go together, so the
/// groups are consecutive chunks. Clustered: a group holds keys of one hash slot only; with keys
/// spread over the 16,384 slots that is mostly one key a command, which a pipeline still sends in
/// one round trip per node.
pub fn groups<K: AsRef<[u8]>>(keys: &[K], clustered: bool, max: usize) -> Vec<Vec<usize>> {
    let max = max.max(1);
    if !clustered {
        let all: Vec<usize> = (0..keys.len()).collect();
        return all.chunks(max).map(<[usize]>::to_vec).collect();
    }
    let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        by_slot.entry(fred::util::redis_keyslot(key.as_ref())).or_default().push(i);
    }
    by_slot.into_values().flat_map(|same| same.chunks(max).map(<[usize]>::to_vec).collect::<Vec<_>>()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(groups: &[Vec<usize>]) -> Vec<usize> {
        let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        all
    }

    #[test]
    fn a_single_server_takes_any_keys_together_in_chunks() {
        let keys = ["a", "b", "c", "d", "e"];
        assert_eq!(groups(&keys, false, 2), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert!(groups::<&str>(&[], false, 2).is_empty());
        assert_eq!(groups(&keys, false, 0), (0..5).map(|i| vec![i]).collect::<Vec<_>>(), "max 0 reads as 1");
    }

    #[test]
    fn a_cluster_command_never_holds_keys_of_two_slots() {
        let keys: Vec<String> = (0..200).map(|i| format!("t:presence:user-{i}")).collect();
        let grouped = groups(&keys, true, 1000);
        assert_eq!(flat(&grouped), (0..200).collect::<Vec<_>>(), "every key once");
        for group in &grouped {
            let slot = fred::util::redis_keyslot(keys[group[0]].as_bytes());
            assert!(group.iter().all(|&i| fred::util::redis_keyslot(keys[i].as_bytes()) == slot), "{group:?}");
        }
        // Keys sharing a hash tag share a slot, and go together up to `max`.
        let tagged = ["{t}:a", "{t}:b", "{t}:c"];
        assert_eq!(groups(&tagged, true, 2), vec![vec![0, 1], vec![2]]);
    }
}
