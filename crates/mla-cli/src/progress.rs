//! Progress of a long benchmark grid on stderr: `[k/N]`, the time spent and an estimate of the time left, one line
//! per finished configuration, so the tables on stdout stay clean when redirected.
//!
//! A line per row rather than a redrawn bar (indicatif): the bench prints its table row by row to stdout, and a bar
//! redrawn on the same terminal would be overwritten by those rows; a log file keeps every line either way.

use std::time::{Duration, Instant};

/// Counts finished configurations, weighting each by its expected cost (e.g. its FLOPs), so that the estimate of
/// the time left is not fooled by a grid whose rows grow.
pub struct Progress {
    start: Instant,
    /// Cost of every configuration, in run order.
    costs: Vec<f64>,
    done: usize,
    quiet: bool,
}

impl Progress {
    /// A grid of `costs.len()` configurations; `quiet` prints nothing (e.g. a single configuration).
    pub fn new(costs: Vec<f64>, quiet: bool) -> Progress {
        Progress { start: Instant::now(), costs, done: 0, quiet }
    }

    /// The estimate after `done` configurations took `elapsed`: the time per unit of cost so far, times the cost
    /// left. `None` before the first one.
    fn remaining(costs: &[f64], done: usize, elapsed: Duration) -> Option<Duration> {
        let spent: f64 = costs[..done].iter().sum();
        let left: f64 = costs[done..].iter().sum();
        (done > 0 && spent > 0.0).then(|| elapsed.mul_f64(left / spent))
    }

    /// Marks one more configuration done and prints `[k/N] elapsed …, about … left`.
    pub fn step(&mut self, what: &str) {
        self.done = (self.done + 1).min(self.costs.len());
        if self.quiet {
            return;
        }
        let elapsed = self.start.elapsed();
        let left = Self::remaining(&self.costs, self.done, elapsed).map_or("?".into(), fmt_duration);
        eprintln!("[{}/{}] {what}: {} elapsed, about {left} left", self.done, self.costs.len(), fmt_duration(elapsed));
    }
}

/// `42.0 s`, `3 min 05 s`, `1 h 02 min`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{} h {:02} min", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_scales_by_cost() {
        let costs = [1.0, 1.0, 2.0, 4.0];
        assert_eq!(Progress::remaining(&costs, 0, Duration::from_secs(0)), None);
        assert_eq!(Progress::remaining(&costs, 2, Duration::from_secs(10)), Some(Duration::from_secs(30)));
        assert_eq!(Progress::remaining(&costs, 4, Duration::from_secs(10)), Some(Duration::ZERO));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(4200)), "4.2 s");
        assert_eq!(fmt_duration(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(fmt_duration(Duration::from_secs(3720)), "1 h 02 min");
    }
}
