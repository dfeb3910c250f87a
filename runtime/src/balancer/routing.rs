//! Which connection gets the next request: the one with the fewest requests outstanding.

/// Index of the connection with the fewest outstanding requests; ties go to the first at or
/// after `start`, so equal loads rotate instead of piling on connection 0. `u64::MAX` marks
/// a connection that must not be picked (down or full); it is returned only when every one
/// is so marked, which the caller checks.
pub fn pick_least_outstanding(outstanding: &[u64], start: usize) -> Option<usize> {
    let n = outstanding.len();
    (0..n)
        .map(|k| (start + k) % n)
        .min_by_key(|&i| outstanding[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_outstanding_with_rotating_ties() {
        assert_eq!(pick_least_outstanding(&[], 0), None);
        assert_eq!(pick_least_outstanding(&[3, 1, 2], 0), Some(1));
        assert_eq!(pick_least_outstanding(&[0, 0, 0], 2), Some(2));
        assert_eq!(pick_least_outstanding(&[0, 0, 0], 4), Some(1));
        assert_eq!(pick_least_outstanding(&[5, u64::MAX, 5], 1), Some(2));
        // Equal load spreads evenly over many picks.
        let mut load = [0u64; 4];
        let mut counts = [0; 4];
        let mut next = 0;
        for _ in 0..400 {
            let i = pick_least_outstanding(&load, next).unwrap();
            counts[i] += 1;
            load[i] += 1;
            next = (i + 1) % 4;
        }
        assert_eq!(counts, [100; 4]);
    }
}
