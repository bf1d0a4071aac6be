//! Learning-rate schedules, as a function of the optimizer step (0-based) and the total number of steps.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// lr * gamma^(step / every)
    Step {
        every: u64,
        gamma: f32,
    },
    /// lr * gamma^step
    Exponential {
        gamma: f32,
    },
    /// Cosine from lr down to lr * min_factor over the run.
    Cosine {
        min_factor: f32,
    },
}

/// A schedule with an optional linear warm-up over the first `warmup` steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub warmup: u64,
}

impl LrSchedule {
    pub fn lr(&self, base: f32, step: u64, total: u64) -> f32 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, gamma } => base * gamma.powi((step / every.max(1)) as i32),
            LrSchedule::Exponential { gamma } => base * gamma.powf(step as f32),
            LrSchedule::Cosine { min_factor } => {
                let t = (step as f32 / total.max(1) as f32).min(1.0);
                base * (min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos()))
            }
        }
    }
}

impl Schedule {
    pub const fn constant() -> Schedule {
        Schedule { kind: LrSchedule::Constant, warmup: 0 }
    }
    pub fn lr(&self, base: f32, step: u64, total: u64) -> f32 {
        let lr = self.kind.lr(base, step.saturating_sub(self.warmup), total.saturating_sub(self.warmup));
        if step < self.warmup {
            lr * (step + 1) as f32 / self.warmup as f32
        } else {
            lr
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;
    /// "constant", "step:EVERY:GAMMA", "exp:GAMMA", "cosine[:MIN_FACTOR]", each optionally followed by
    /// "+warmup:STEPS".
    fn from_str(s: &str) -> Result<Schedule, String> {
        let (main, warm) = match s.split_once("+warmup:") {
            Some((m, w)) => (m, w.parse::<u64>().map_err(|_| format!("bad warm-up steps in {s:?}"))?),
            None => (s, 0),
        };
        let parts: Vec<&str> = main.split(':').collect();
        let num = |i: usize| -> Result<f32, String> { parts.get(i).ok_or(format!("{s:?}: missing value"))?.parse::<f32>().map_err(|_| format!("{s:?}: bad number")) };
        let kind = match parts[0] {
            "constant" => LrSchedule::Constant,
            "step" => LrSchedule::Step { every: num(1)? as u64, gamma: num(2)? },
            "exp" | "exponential" => LrSchedule::Exponential { gamma: num(1)? },
            "cosine" => LrSchedule::Cosine { min_factor: if parts.len() > 1 { num(1)? } else { 0.0 } },
            other => return Err(format!("unknown schedule {other:?} (constant, step:EVERY:GAMMA, exp:GAMMA, cosine[:MIN], +warmup:N)")),
        };
        Ok(Schedule { kind, warmup: warm })
    }
}
