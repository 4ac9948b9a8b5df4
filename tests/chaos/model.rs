//! The workload's model: random `chaos_pipeline` inputs and, for each, the outcome the
//! driver expects, computed here without calling the pipeline's code (the rules are the
//! ones documented in `orchestrator/src/pipelines/chaos.rs`; a disagreement is counted as
//! a wrong result).

use serde::Serialize;
use serde_json::{Value, json};

/// A small deterministic random number generator (splitmix64), so a run is reproducible
/// from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        finalise(self.0)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

fn finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64 of one value (the pipeline's `splitmix64`).
fn splitmix64(z: u64) -> u64 {
    finalise(z.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

/// The pipeline's mixing function, written out again from its documentation.
pub fn mix(a: u64, b: u64) -> u64 {
    splitmix64(a.rotate_left(17) ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// One step, as the driver sends it.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `compute`, `heartbeat`, `flaky` or `blob`.
    pub kind: &'static str,
    /// `cpu` or `gpu`.
    pub queue: &'static str,
    /// `compute`: rounds.
    pub rounds: u32,
    /// `heartbeat`: beats.
    pub beats: u32,
    /// `heartbeat`: ms between beats.
    pub beat_ms: u64,
    /// `flaky`: failing attempts.
    pub fail_first: u32,
    /// `blob`: bytes.
    pub bytes: u64,
    /// `blob`: hand the result to an echo activity.
    pub echo: bool,
}

impl Step {
    fn new(kind: &'static str, queue: &'static str) -> Step {
        Step {
            kind,
            queue,
            rounds: 0,
            beats: 0,
            beat_ms: 0,
            fail_first: 0,
            bytes: 0,
            echo: false,
        }
    }

    /// A hash chain of `rounds`.
    pub fn compute(queue: &'static str, rounds: u32) -> Step {
        Step {
            rounds,
            ..Step::new("compute", queue)
        }
    }

    /// `beats` heartbeats `beat_ms` apart.
    pub fn heartbeat(queue: &'static str, beats: u32, beat_ms: u64) -> Step {
        Step {
            beats,
            beat_ms,
            ..Step::new("heartbeat", queue)
        }
    }

    /// Fails its first `fail_first` attempts.
    pub fn flaky(queue: &'static str, fail_first: u32) -> Step {
        Step {
            fail_first,
            ..Step::new("flaky", queue)
        }
    }

    /// A result of `bytes` bytes, echoed to a next activity with `echo`.
    pub fn blob(queue: &'static str, bytes: u64, echo: bool) -> Step {
        Step {
            bytes,
            echo,
            ..Step::new("blob", queue)
        }
    }

    /// The activity this step schedules.
    pub fn activity(&self) -> String {
        format!("chaos_{}_{}", self.kind, self.queue)
    }
}

/// What the driver expects of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Completes with this output; `activities[seq]` is each activity's name and the value
    /// its one recorded result must carry.
    Completed {
        /// The workflow's output.
        output: Value,
        /// Per activity, in scheduling order.
        activities: Vec<(String, u64)>,
    },
    /// Fails with this error kind, at the last activity listed (the others completed).
    Failed {
        /// The failure's kind.
        kind: String,
        /// The activities scheduled, the last one failing.
        activities: Vec<(String, u64)>,
    },
    /// Either completes like `Completed` or fails with this kind (a clear error) — the
    /// runtime may refuse a payload near its limits, but never hang on it.
    CompletedOrFailed {
        /// The output if it completes.
        output: Value,
        /// The failure's kind if it fails.
        kind: String,
        /// Per activity, in scheduling order.
        activities: Vec<(String, u64)>,
    },
}

impl Expected {
    /// The activities and their expected values.
    pub fn activities(&self) -> &[(String, u64)] {
        match self {
            Expected::Completed { activities, .. }
            | Expected::Failed { activities, .. }
            | Expected::CompletedOrFailed { activities, .. } => activities,
        }
    }

    /// A short description, for violation reports.
    pub fn name(&self) -> String {
        match self {
            Expected::Completed { output, .. } => format!("completed {output}"),
            Expected::Failed { kind, .. } => format!("failed {kind}"),
            Expected::CompletedOrFailed { output, kind, .. } => {
                format!("completed {output} or failed {kind}")
            }
        }
    }
}

/// Limits the model needs: a result over `max_result` bytes fails with `PayloadTooLarge`;
/// one between `near_limit` and `max_result` may.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest activity result the workers can report (the server's max payload less
    /// the envelope).
    pub max_result: u64,
    /// Above this, a result (with the journal batch around it) is near the limits.
    pub near_limit: u64,
}

/// The expected outcome of a run of `steps` from `seed`.
pub fn expected(seed: u64, steps: &[Step], limits: Limits) -> Expected {
    let mut value = seed;
    let mut activities = Vec::new();
    let mut near = false;
    for (i, step) in steps.iter().enumerate() {
        let mut s = mix(value, i as u64 + 1);
        match step.kind {
            "compute" => {
                for r in 0..step.rounds {
                    s = mix(s, u64::from(r));
                }
            }
            "heartbeat" => {
                for b in 0..step.beats {
                    s = mix(s, u64::from(b));
                }
            }
            "flaky" => s = mix(s, u64::from(step.fail_first)),
            "blob" => {
                // The report carries the string plus a small envelope.
                if step.bytes + 1024 > limits.max_result {
                    // Scheduled, never completed: the value is never compared.
                    activities.push((step.activity(), 0));
                    return Expected::Failed {
                        kind: "PayloadTooLarge".into(),
                        activities,
                    };
                }
                // Echoed, the journal batch holds it twice (the result and the next input).
                let journalled = if step.echo {
                    2 * step.bytes
                } else {
                    step.bytes
                };
                near |= journalled > limits.near_limit;
                s = mix(s, step.bytes);
            }
            other => panic!("unknown step kind {other}"),
        }
        activities.push((step.activity(), s));
        value = s;
        if step.kind == "blob" && step.echo {
            value = mix(value, step.bytes);
            activities.push((format!("chaos_echo_{}", step.queue), value));
        }
    }
    let output = json!({"value": value, "steps": steps.len()});
    if near {
        Expected::CompletedOrFailed {
            output,
            kind: "PayloadTooLarge".into(),
            activities,
        }
    } else {
        Expected::Completed { output, activities }
    }
}

/// The workflow's input as JSON.
pub fn input(seed: u64, steps: &[Step]) -> Value {
    json!({"seed": seed, "steps": steps})
}

const QUEUES: [&str; 2] = ["cpu", "gpu"];

/// A random ordinary run: 3 to 8 steps over both queues, about half compute, a quarter
/// heartbeating (3-8 beats of 200-500 ms), a quarter flaky (1-2 failing attempts).
pub fn standard(rng: &mut Rng) -> Vec<Step> {
    let n = rng.range(3, 8);
    (0..n)
        .map(|_| {
            let queue = QUEUES[rng.below(2) as usize];
            match rng.below(4) {
                0 | 1 => Step::compute(queue, rng.range(1, 2_000) as u32),
                2 => Step::heartbeat(queue, rng.range(3, 8) as u32, rng.range(200, 500)),
                _ => Step::flaky(queue, rng.range(1, 2) as u32),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_result: 8 << 20,
        near_limit: 6 << 20,
    };

    #[test]
    fn splitmix_matches_the_reference() {
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn outcomes() {
        let steps = vec![Step::compute("cpu", 3), Step::flaky("gpu", 1)];
        match expected(7, &steps, LIMITS) {
            Expected::Completed { output, activities } => {
                assert_eq!(activities.len(), 2);
                assert_eq!(output["value"], activities[1].1);
                assert_eq!(activities[1].0, "chaos_flaky_gpu");
            }
            other => panic!("{other:?}"),
        }
        let big = vec![Step::compute("cpu", 3), Step::blob("cpu", 9 << 20, false)];
        assert!(
            matches!(expected(7, &big, LIMITS), Expected::Failed { activities, .. } if activities.len() == 2)
        );
        let near = vec![Step::blob("gpu", 4 << 20, true)];
        assert!(matches!(
            expected(7, &near, LIMITS),
            Expected::CompletedOrFailed { activities, .. } if activities.len() == 2
        ));
    }
}
