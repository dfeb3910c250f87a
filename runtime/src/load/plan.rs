//! What a sweep runs: the load levels (`start:end:step`), the arrival process of the open
//! loop and how the load is split over threads and connections.

use std::fmt;

use super::LoadError;

/// Closed loop (a fixed number of requests outstanding) or open loop (a request rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Level {
    /// Requests outstanding at all times, all connections together.
    Concurrency(usize),
    /// Requests per second, all threads together.
    Rate(f64),
}

impl Level {
    /// `concurrency` or `request_rate`: the first column of the summary CSV.
    pub fn kind(&self) -> &'static str {
        match self {
            Level::Concurrency(_) => "concurrency",
            Level::Rate(_) => "request_rate",
        }
    }

    pub fn value(&self) -> f64 {
        match *self {
            Level::Concurrency(c) => c as f64,
            Level::Rate(r) => r,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Concurrency(c) => write!(f, "concurrency {c}"),
            Level::Rate(r) => write!(f, "rate {r} req/s"),
        }
    }
}

/// `start[:end[:step]]` as perf_analyzer reads it: start, start+step, ... up to and including
/// end (step defaults to 1, end to start).
pub fn parse_range(s: &str) -> Result<Vec<f64>, LoadError> {
    let bad = |why: &str| LoadError::Config(format!("range {s:?}: {why} (want start:end:step)"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.is_empty() || parts.len() > 3 {
        return Err(bad("one to three numbers"));
    }
    let num = |p: &str| p.trim().parse::<f64>().map_err(|_| bad("not a number"));
    let start = num(parts[0])?;
    let end = parts.get(1).map(|p| num(p)).transpose()?.unwrap_or(start);
    let step = parts.get(2).map(|p| num(p)).transpose()?.unwrap_or(1.0);
    if !(start.is_finite() && end.is_finite() && step.is_finite()) || start <= 0.0 {
        return Err(bad("start must be above 0"));
    }
    if end < start {
        return Err(bad("end below start"));
    }
    if step <= 0.0 {
        return Err(bad("step must be above 0"));
    }
    let n = ((end - start) / step + 1e-9).floor() as usize + 1;
    if n > 10_000 {
        return Err(bad("more than 10000 levels"));
    }
    Ok((0..n).map(|i| start + step * i as f64).collect())
}

/// Concurrency levels from a range (whole numbers only).
pub fn concurrency_levels(s: &str) -> Result<Vec<Level>, LoadError> {
    parse_range(s)?
        .into_iter()
        .map(|v| {
            if v.fract() != 0.0 {
                Err(LoadError::Config(format!(
                    "--concurrency-range {s:?}: {v} is not a whole number"
                )))
            } else {
                Ok(Level::Concurrency(v as usize))
            }
        })
        .collect()
}

/// Rate levels from a range.
pub fn rate_levels(s: &str) -> Result<Vec<Level>, LoadError> {
    Ok(parse_range(s)?.into_iter().map(Level::Rate).collect())
}

/// How the open loop spaces its sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// Evenly spaced.
    Constant,
    /// Exponential gaps (a Poisson process).
    Poisson,
}

impl Distribution {
    pub fn parse(s: &str) -> Result<Distribution, LoadError> {
        match s {
            "constant" => Ok(Distribution::Constant),
            "poisson" => Ok(Distribution::Poisson),
            other => Err(LoadError::Config(format!(
                "--request-distribution must be constant or poisson, not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Distribution::Constant => "constant",
            Distribution::Poisson => "poisson",
        }
    }
}

/// One thread's intended send times for an open-loop level: `rate` req/s of `distribution`,
/// starting at `first_ns` (ns since the level's origin). Each thread gets rate/threads; the
/// constant schedules are offset so that together they are evenly spaced too, and Poisson
/// processes add up to a Poisson process of the total rate.
pub struct Schedule {
    next_ns: f64,
    mean_gap_ns: f64,
    distribution: Distribution,
    rng: XorShift,
}

impl Schedule {
    pub fn new(rate: f64, distribution: Distribution, first_ns: f64, seed: u64) -> Schedule {
        let mut s = Schedule {
            next_ns: first_ns,
            mean_gap_ns: 1e9 / rate,
            distribution,
            rng: XorShift::new(seed),
        };
        if distribution == Distribution::Poisson {
            s.next_ns += s.gap();
        }
        s
    }

    /// The intended time of the next send (ns since the origin).
    pub fn next(&self) -> u64 {
        self.next_ns as u64
    }

    /// Moves to the send after it.
    pub fn advance(&mut self) {
        self.next_ns += self.gap();
    }

    fn gap(&mut self) -> f64 {
        match self.distribution {
            Distribution::Constant => self.mean_gap_ns,
            // Inverse transform: -ln(U) is exponential with mean 1, U in (0, 1].
            Distribution::Poisson => -self.rng.unit().ln() * self.mean_gap_ns,
        }
    }
}

/// xorshift64*: a few instructions per draw, no allocation, reproducible from its seed.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// How a closed-loop level's outstanding requests are spread: connection `i` of `n` keeps
/// `outstanding[i]` in flight (the first `c % n` one more), each at most `depth`.
pub fn spread(
    concurrency: usize,
    connections: usize,
    depth: usize,
) -> Result<Vec<usize>, LoadError> {
    if concurrency > connections * depth {
        return Err(LoadError::Config(format!(
            "concurrency {concurrency} is above connections x depth ({connections} x {depth}): raise -c or --depth"
        )));
    }
    Ok((0..connections)
        .map(|i| concurrency / connections + usize::from(i < concurrency % connections))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_include_their_end() {
        assert_eq!(parse_range("1:4:1").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(parse_range("2:9:3").unwrap(), vec![2.0, 5.0, 8.0]);
        assert_eq!(parse_range("5").unwrap(), vec![5.0]);
        assert_eq!(parse_range("0.5:1.5:0.5").unwrap(), vec![0.5, 1.0, 1.5]);
        assert!(parse_range("4:1").is_err());
        assert!(parse_range("0:4").is_err());
        assert!(parse_range("1:4:0").is_err());
        assert!(parse_range("a").is_err());
        assert!(concurrency_levels("1.5").is_err());
        assert_eq!(concurrency_levels("1:3").unwrap()[2], Level::Concurrency(3));
    }

    #[test]
    fn poisson_gaps_have_the_mean_of_the_rate() {
        let mut s = Schedule::new(1000.0, Distribution::Poisson, 0.0, 7);
        let first = s.next();
        for _ in 0..100_000 {
            s.advance();
        }
        let mean_gap = (s.next() - first) as f64 / 100_000.0;
        assert!((mean_gap - 1e6).abs() < 2e4, "mean gap {mean_gap} ns");
        let mut c = Schedule::new(1000.0, Distribution::Constant, 500.0, 7);
        assert_eq!(c.next(), 500);
        c.advance();
        assert_eq!(c.next(), 1_000_500);
    }

    #[test]
    fn outstanding_requests_spread_evenly() {
        assert_eq!(spread(5, 2, 4).unwrap(), vec![3, 2]);
        assert_eq!(spread(1, 3, 1).unwrap(), vec![1, 0, 0]);
        assert!(spread(9, 2, 4).is_err());
    }
}
