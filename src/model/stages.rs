//! Optional wall-time accounting of the forward's stages, by the number of rows in the step
//! (`lethe bench decode --stages`).
//!
//! It answers "what does the second row of a CFG pair cost, and where": a 2-row step against a
//! 1-row step, stage by stage (projections, attention, the row-wise work, the LM head). Off by
//! default; when off, a step pays one thread-local read. When on, a step pays seven clock
//! reads per layer (well under 1 % of a decode step).
//!
//! The switch and the counters belong to the thread that runs the forward (the benchmark's, an
//! engine's), so concurrent users do not mix; counters are keyed by the step's row count
//! (steps of more than [`MAX_ROWS`] rows, prefills, are not counted).

use std::cell::{Cell, RefCell};
use std::time::Instant;

/// Largest step (rows) that is accounted.
pub const MAX_ROWS: usize = 32;

/// The stages of a native forward step, in the order they run within a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// RMSNorms, residual adds and SwiGLU (row-wise work between the projections), and the
    /// step's set-up (KV plan, RoPE tables, embedding).
    RowWise,
    /// The fused q|k|v projection.
    Qkv,
    /// RoPE, the KV-cache writes and attention over the cache.
    Attention,
    /// The output projection.
    O,
    /// The fused gate|up projection.
    GateUp,
    /// The down projection.
    Down,
    /// The final norm's rows through the LM head (logits).
    LmHead,
}

impl Stage {
    pub const ALL: [Stage; 7] =
        [Stage::RowWise, Stage::Qkv, Stage::Attention, Stage::O, Stage::GateUp, Stage::Down, Stage::LmHead];

    pub fn name(self) -> &'static str {
        match self {
            Stage::RowWise => "norms/adds/swiglu",
            Stage::Qkv => "qkv",
            Stage::Attention => "attention",
            Stage::O => "o",
            Stage::GateUp => "gate|up",
            Stage::Down => "down",
            Stage::LmHead => "lm head",
        }
    }
}

const N_STAGES: usize = Stage::ALL.len();

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// `[rows - 1][stage]` nanoseconds.
    static NANOS: RefCell<[[u64; N_STAGES]; MAX_ROWS]> = const { RefCell::new([[0; N_STAGES]; MAX_ROWS]) };
    /// `[rows - 1]` completed steps.
    static STEPS: RefCell<[u64; MAX_ROWS]> = const { RefCell::new([0; MAX_ROWS]) };
}

/// Whether this thread's steps are being accounted.
pub fn enabled() -> bool {
    ENABLED.get()
}

/// Turns the accounting of this thread's steps on or off.
pub fn enable(on: bool) {
    ENABLED.set(on);
}

/// Clears this thread's counters.
pub fn reset() {
    NANOS.with_borrow_mut(|n| *n = [[0; N_STAGES]; MAX_ROWS]);
    STEPS.with_borrow_mut(|s| *s = [0; MAX_ROWS]);
}

/// Mean time per step of each stage, for steps of `rows` rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageTimes {
    pub rows: usize,
    pub steps: u64,
    /// Microseconds per step, in [`Stage::ALL`] order.
    pub us_per_step: Vec<(Stage, f64)>,
}

impl StageTimes {
    pub fn total_us(&self) -> f64 {
        self.us_per_step.iter().map(|(_, us)| us).sum()
    }

    /// The step-weighted mean of two accountings of the same row count.
    pub fn merge(&self, other: &StageTimes) -> StageTimes {
        let steps = self.steps + other.steps;
        let (a, b) = (self.steps as f64 / steps.max(1) as f64, other.steps as f64 / steps.max(1) as f64);
        StageTimes {
            rows: self.rows,
            steps,
            us_per_step: self
                .us_per_step
                .iter()
                .zip(&other.us_per_step)
                .map(|(x, y)| (x.0, a * x.1 + b * y.1))
                .collect(),
        }
    }
}

/// What this thread has accounted for steps of `rows` rows; `None` if none ran (or `rows` is
/// out of range).
pub fn snapshot(rows: usize) -> Option<StageTimes> {
    let i = rows.checked_sub(1).filter(|&i| i < MAX_ROWS)?;
    let steps = STEPS.with_borrow(|s| s[i]);
    let nanos = NANOS.with_borrow(|n| n[i]);
    (steps > 0).then(|| StageTimes {
        rows,
        steps,
        us_per_step: Stage::ALL.iter().zip(nanos).map(|(&s, n)| (s, n as f64 / steps as f64 / 1e3)).collect(),
    })
}

/// Times one step: each [`Self::lap`] charges the time since the previous lap to a stage.
/// Inert when the accounting is off or the step is too large.
pub struct StepTimer {
    slot: Option<(usize, Instant)>,
}

impl StepTimer {
    pub fn start(rows: usize) -> Self {
        let on = ENABLED.get() && (1..=MAX_ROWS).contains(&rows);
        Self { slot: on.then(|| (rows - 1, Instant::now())) }
    }

    #[inline]
    pub fn lap(&mut self, stage: Stage) {
        if let Some((i, last)) = &mut self.slot {
            let now = Instant::now();
            NANOS.with_borrow_mut(|n| n[*i][stage as usize] += (now - *last).as_nanos() as u64);
            *last = now;
        }
    }

    /// Ends the step (counts it).
    pub fn finish(self) {
        if let Some((i, _)) = self.slot {
            STEPS.with_borrow_mut(|s| s[i] += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Laps land on their stage and row count; an off switch, an oversized step or another
    /// thread records nothing here.
    #[test]
    fn laps_are_charged_to_their_stage_and_row_count() {
        reset();
        StepTimer::start(2).finish();
        assert_eq!(snapshot(2), None, "off: nothing recorded");
        enable(true);
        for _ in 0..2 {
            let mut t = StepTimer::start(2);
            std::thread::sleep(std::time::Duration::from_millis(2));
            t.lap(Stage::Attention);
            t.lap(Stage::LmHead);
            t.finish();
        }
        StepTimer::start(MAX_ROWS + 1).finish();
        std::thread::spawn(|| {
            enable(true);
            StepTimer::start(1).finish();
        })
        .join()
        .unwrap();
        enable(false);
        let s = snapshot(2).expect("two steps of 2 rows");
        assert_eq!(s.steps, 2);
        let at = |stage| s.us_per_step.iter().find(|(x, _)| *x == stage).unwrap().1;
        assert!(at(Stage::Attention) >= 2000.0, "{s:?}");
        assert!(at(Stage::LmHead) < at(Stage::Attention), "{s:?}");
        assert_eq!(at(Stage::Qkv), 0.0);
        assert!(s.total_us() >= at(Stage::Attention));
        assert_eq!(snapshot(1), None);
        assert_eq!(snapshot(MAX_ROWS + 1), None);
        assert_eq!(snapshot(0), None);
        let twice = s.merge(&s);
        assert_eq!(twice.steps, 4);
        assert_eq!(twice.us_per_step, s.us_per_step);
        reset();
        assert_eq!(snapshot(2), None);
    }
}
