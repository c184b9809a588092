//! A progress line with an ETA on stderr: redrawn in place on a terminal, one line every ten
//! seconds otherwise (logs of scripts and CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(label: &str, quiet: bool) -> Self {
        Self {
            label: label.to_string(),
            total: 0,
            done: 0,
            started: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    pub fn set_total(&mut self, total: usize) {
        self.total = total;
        self.done = 0;
        self.started = Instant::now();
        self.draw(true);
    }

    pub fn tick(&mut self, n: usize) {
        self.done += n;
        self.draw(self.done >= self.total);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn draw(&mut self, force: bool) {
        if self.quiet {
            return;
        }
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(10) };
        if !force && self.last_draw.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_draw = Some(Instant::now());
        let elapsed = self.started.elapsed().as_secs_f64();
        let frac = if self.total == 0 { 1.0 } else { self.done as f64 / self.total as f64 };
        let eta = if self.done == 0 { f64::NAN } else { elapsed / frac - elapsed };
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        let line = format!(
            "{} [{}{}] {}/{} {} ETA {}",
            self.label,
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total,
            clock(elapsed),
            if eta.is_finite() { clock(eta) } else { "?".into() }
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            if self.done >= self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}

/// `1m05s`-style durations.
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 60 { format!("{}m{:02}s", s / 60, s % 60) } else { format!("{s}s") }
}
