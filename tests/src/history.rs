//! The log of every guest write, so the oracle can walk the guest's tables
//! as they were at any moment since a vCPU's last flush (a real TLB may still
//! hold a translation from then).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Guest writes of one domain, oldest first. State `k` is guest memory after
/// the first `k` writes; the current state is `now()`.
#[derive(Default, Debug)]
pub struct History {
    /// (gpa, value before the write) per write.
    log: Vec<(u64, u64)>,
    /// Write sequence numbers per gpa, ascending.
    by_addr: BTreeMap<u64, Vec<usize>>,
}

impl History {
    /// The number of writes so far (the current state).
    pub fn now(&self) -> usize {
        self.log.len()
    }
    /// Records a write to the 8-byte word at `gpa` that held `old`.
    pub fn record(&mut self, gpa: u64, old: u64) {
        let seq = self.log.len();
        self.log.push((gpa & !7, old));
        self.by_addr.entry(gpa & !7).or_default().push(seq);
    }
    /// The value the word at `gpa` had in state `k`, given its current value.
    pub fn value_at(&self, gpa: u64, k: usize, current: u64) -> u64 {
        let Some(seqs) = self.by_addr.get(&(gpa & !7)) else {
            return current;
        };
        let i = seqs.partition_point(|&s| s < k);
        match seqs.get(i) {
            Some(&s) => self.log[s].1,
            None => current,
        }
    }
    /// The sequence number of the last write to `gpa`, if any.
    pub fn last_write(&self, gpa: u64) -> Option<usize> {
        self.by_addr
            .get(&(gpa & !7))
            .and_then(|s| s.last().copied())
    }
    /// The gpa written by write number `seq`.
    pub fn addr_of(&self, seq: usize) -> u64 {
        self.log[seq].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_past_states() {
        let mut h = History::default();
        h.record(0x10, 1); // 1 -> 2
        h.record(0x18, 7); // 7 -> 8
        h.record(0x10, 2); // 2 -> 3
        assert_eq!(h.value_at(0x10, 0, 3), 1);
        assert_eq!(h.value_at(0x10, 1, 3), 2);
        assert_eq!(h.value_at(0x10, 2, 3), 2);
        assert_eq!(h.value_at(0x10, 3, 3), 3);
        assert_eq!(h.value_at(0x18, 1, 8), 7);
        assert_eq!(h.value_at(0x18, 2, 8), 8);
        assert_eq!(h.value_at(0x20, 0, 5), 5);
        assert_eq!(h.last_write(0x10), Some(2));
    }
}
