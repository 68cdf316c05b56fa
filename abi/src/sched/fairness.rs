//! Fairness arithmetic for run reports and the conformance suite: Jain's
//! index and the CPU shares weights call for, in exact integer arithmetic
//! (parts per million), so the kernel can print them without floating point.

use super::MAX_VCPUS;
use core::fmt;

/// A fraction in parts per million (`Ppm(1_000_000)` is 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ppm(pub u32);

impl Ppm {
    /// One (all of it).
    pub const ONE: Ppm = Ppm(1_000_000);

    /// `num / den` in parts per million, rounded down (`den` 0 gives 0;
    /// saturates at `u32::MAX`).
    pub fn ratio(num: u128, den: u128) -> Ppm {
        if den == 0 {
            return Ppm(0);
        }
        Ppm(u32::try_from(num.saturating_mul(1_000_000) / den).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for Ppm {
    /// `0.993412`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// Jain's fairness index of the CPU times `times`: `(Σx)² / (n · Σx²)`, 1
/// when all are equal, `1/n` when one got everything. `None` for no times or
/// all zero (undefined).
pub fn jain_index(times: &[u64]) -> Option<Ppm> {
    // The index does not change with the unit: scale the times below 2^40
    // so the sums of squares (over at most 2^16 vCPUs) cannot overflow.
    let max = times.iter().copied().max().unwrap_or(0);
    let shift = 64u32.saturating_sub(max.leading_zeros()).saturating_sub(40);
    let scaled = || times.iter().map(move |&t| (t >> shift) as u128);
    let n = times.len() as u128;
    let sum: u128 = scaled().sum();
    let squares: u128 = scaled().map(|t| t * t).sum();
    if n == 0 || squares == 0 {
        return None;
    }
    Some(Ppm::ratio(sum * sum, n.saturating_mul(squares)))
}

/// Jain's index within each group of vCPUs that share a key (for a run
/// report: the weight, so "over equal-weight vCPUs"; add the pCPU to judge a
/// pinned policy per pCPU), for groups of at least two with some CPU time:
/// the lowest index and the size of that group, or `None` if no group
/// qualifies. Takes the first [`MAX_VCPUS`] of `min(keys, times)`.
pub fn jain_by_key(keys: &[u64], times: &[u64]) -> Option<(Ppm, usize)> {
    let n = keys.len().min(times.len()).min(MAX_VCPUS);
    let (keys, times) = (&keys[..n], &times[..n]);
    let mut group = [0u64; MAX_VCPUS];
    let mut worst: Option<(Ppm, usize)> = None;
    for (i, &key) in keys.iter().enumerate() {
        // Each group once: at its first member.
        if keys[..i].contains(&key) {
            continue;
        }
        let mut len = 0;
        for (_, &t) in keys.iter().zip(times).filter(|(&k, _)| k == key) {
            group[len] = t;
            len += 1;
        }
        if len < 2 {
            continue;
        }
        if let Some(j) = jain_index(&group[..len]) {
            if worst.is_none_or(|(w, _)| j < w) {
                worst = Some((j, len));
            }
        }
    }
    worst
}

/// The share of the group's CPU time each of `weights` should get when all
/// stay runnable on `pcpus` pCPUs under a work-conserving proportional-share
/// policy: proportional to weight, except that no vCPU can use more than one
/// pCPU (its share is capped at `1 / min(vCPUs, pcpus)` and the rest is
/// divided among the others by weight: water filling). Writes the first
/// `min(weights.len(), out.len())` shares and returns that count. A weight of
/// 0 gets 0. Quadratic in the number of vCPUs (groups are small).
pub fn expected_shares(weights: &[u32], pcpus: u32, out: &mut [Ppm]) -> usize {
    let n = weights.len();
    let lanes = (pcpus.max(1) as usize).min(n.max(1)) as u128;
    let cap = 1_000_000u128 / lanes;
    // vCPUs with weight >= threshold are capped; lower the threshold until
    // nobody left uncapped would get more than the cap.
    let mut threshold = u64::MAX;
    let share = |w: u32, threshold: u64| -> u128 {
        let capped = weights.iter().filter(|&&x| x as u64 >= threshold).count() as u128;
        let rest: u128 = weights
            .iter()
            .filter(|&&x| (x as u64) < threshold)
            .map(|&x| x as u128)
            .sum();
        if w as u64 >= threshold {
            cap
        } else {
            // No uncapped weight left: nothing to divide.
            (1_000_000u128.saturating_sub(capped * cap) * w as u128)
                .checked_div(rest)
                .unwrap_or(0)
        }
    };
    for _ in 0..=n {
        let over = weights
            .iter()
            .filter(|&&w| (w as u64) < threshold && share(w, threshold) > cap)
            .map(|&w| w as u64)
            .min();
        match over {
            Some(w) => threshold = w,
            None => break,
        }
    }
    let mut written = 0;
    for (o, &w) in out.iter_mut().zip(weights) {
        *o = Ppm(share(w, threshold) as u32);
        written += 1;
    }
    written
}

/// One vCPU's share of its group's CPU time: what its weight calls for and
/// what it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Share {
    /// What the weights call for ([`expected_shares`]).
    pub expected: Ppm,
    /// Its CPU time over the group's.
    pub achieved: Ppm,
}

impl Share {
    /// `|achieved − expected| / expected` (`u32::MAX` parts when nothing was
    /// expected and something was achieved).
    pub fn deviation(&self) -> Ppm {
        let diff = self.achieved.0.abs_diff(self.expected.0) as u128;
        if self.expected.0 == 0 {
            return if diff == 0 { Ppm(0) } else { Ppm(u32::MAX) };
        }
        Ppm::ratio(diff, self.expected.0 as u128)
    }
}

/// The shares of a group of vCPUs with `weights` that used `times` of CPU
/// on `pcpus` pCPUs: expected ([`expected_shares`]) and achieved (each time
/// over the sum). Writes `min` of the three lengths and [`MAX_VCPUS`] and
/// returns that count.
pub fn weighted_shares(weights: &[u32], times: &[u64], pcpus: u32, out: &mut [Share]) -> usize {
    let n = weights.len().min(times.len()).min(out.len()).min(MAX_VCPUS);
    let mut expected = [Ppm(0); MAX_VCPUS];
    expected_shares(&weights[..n], pcpus, &mut expected[..n]);
    let total: u128 = times[..n].iter().map(|&t| t as u128).sum();
    for ((o, &e), &t) in out[..n].iter_mut().zip(&expected[..n]).zip(&times[..n]) {
        *o = Share {
            expected: e,
            achieved: Ppm::ratio(t as u128, total),
        };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::{expected_shares, jain_by_key, jain_index, weighted_shares, Ppm, Share};

    #[test]
    fn jain_is_one_for_equal_and_one_over_n_for_a_monopoly() {
        assert_eq!(jain_index(&[5, 5, 5, 5]), Some(Ppm::ONE));
        assert_eq!(jain_index(&[9, 0, 0, 0]), Some(Ppm(250_000)));
        assert_eq!(jain_index(&[]), None);
        assert_eq!(jain_index(&[0, 0]), None);
        // (1+2+3)^2 / (3 * 14) = 36/42.
        assert_eq!(jain_index(&[1, 2, 3]), Some(Ppm(857_142)));
        // Large times do not overflow.
        let big = [u64::MAX / 4, u64::MAX / 4];
        assert_eq!(jain_index(&big), Some(Ppm::ONE));
    }

    #[test]
    fn expected_shares_follow_weights_and_cap_at_one_pcpu() {
        let mut out = [Ppm(0); 4];
        assert_eq!(expected_shares(&[1, 1, 2, 4], 2, &mut out), 4);
        assert_eq!(
            out,
            [Ppm(125_000), Ppm(125_000), Ppm(250_000), Ppm(500_000)]
        );
        // On 2 pCPUs a weight-8 vCPU cannot use more than half.
        let mut out = [Ppm(0); 3];
        expected_shares(&[1, 1, 8], 2, &mut out);
        assert_eq!(out, [Ppm(250_000), Ppm(250_000), Ppm(500_000)]);
        // Fewer vCPUs than pCPUs: each one pCPU, whatever the weights.
        expected_shares(&[1, 2, 100], 8, &mut out);
        assert_eq!(out, [Ppm(333_333); 3]);
        // Caps cascade: 16 and 8 both capped at 1/3 on 3 pCPUs.
        let mut out = [Ppm(0); 5];
        expected_shares(&[16, 8, 1, 1, 2], 3, &mut out);
        assert_eq!(out[0], Ppm(333_333));
        assert_eq!(out[1], Ppm(333_333));
        assert_eq!(out[4], Ppm(166_667));
        // Short output: the first shares of the whole group.
        let mut one = [Ppm(0); 1];
        assert_eq!(expected_shares(&[1, 3], 1, &mut one), 1);
        assert_eq!(one[0], Ppm(250_000));
    }

    #[test]
    fn weighted_shares_measure_the_deviation() {
        let mut out = [Share::default(); 3];
        assert_eq!(
            weighted_shares(&[1, 1, 2], &[240, 260, 500], 1, &mut out),
            3
        );
        assert_eq!(out[0].expected, Ppm(250_000));
        assert_eq!(out[0].achieved, Ppm(240_000));
        assert_eq!(out[0].deviation(), Ppm(40_000));
        assert_eq!(out[2].deviation(), Ppm(0));
        let nothing_due = Share {
            expected: Ppm(0),
            achieved: Ppm(1),
        };
        assert_eq!(nothing_due.deviation(), Ppm(u32::MAX));
        assert_eq!(format!("{}", Ppm(993_412)), "0.993412");
    }

    #[test]
    fn jain_by_key_judges_each_group_and_reports_the_worst() {
        // Weights 1 (times 10, 10), 2 (times 30, 10), 3 (a group of one).
        let keys = [1, 2, 1, 2, 3];
        let times = [10, 30, 10, 10, 99];
        // Group 2: (40)^2 / (2 * 1000) = 0.8.
        assert_eq!(jain_by_key(&keys, &times), Some((Ppm(800_000), 2)));
        assert_eq!(jain_by_key(&[1, 1, 1], &[5, 5, 5]), Some((Ppm::ONE, 3)));
        assert_eq!(jain_by_key(&[1, 2], &[5, 5]), None, "no group of two");
        assert_eq!(jain_by_key(&[1, 1], &[0, 0]), None, "no CPU time");
    }
}
