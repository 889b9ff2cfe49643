//! The multistep solvers' settings and the names diffusers gives them, in one place for
//! the request options, the config checks and the schedulers that read them.

/// DPM-Solver's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmType {
    /// `dpmsolver++`.
    DpmSolverPlusPlus,
    /// `sde-dpmsolver++`.
    SdeDpmSolverPlusPlus,
}

/// The second-order update of the multistep solvers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// DPM-Solver's midpoint update.
    Midpoint,
    /// DPM-Solver's Heun update.
    Heun,
    /// UniPC's B(h) = h.
    Bh1,
    /// UniPC's B(h) = e^h - 1.
    Bh2,
}

/// The solver orders the multistep schedulers take.
pub const SOLVER_ORDERS: std::ops::RangeInclusive<usize> = 1..=3;

/// `solver_type` names UniPC reads as `bh2`, as diffusers does.
pub const UNIPC_BH2_ALIASES: [&str; 3] = ["midpoint", "heun", "logrho"];

impl AlgorithmType {
    /// Its diffusers name.
    pub fn name(self) -> &'static str {
        match self {
            AlgorithmType::DpmSolverPlusPlus => "dpmsolver++",
            AlgorithmType::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
        }
    }

    /// The algorithm diffusers names `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::DpmSolverPlusPlus, Self::SdeDpmSolverPlusPlus]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

impl SolverType {
    /// Its diffusers name.
    pub fn name(self) -> &'static str {
        match self {
            SolverType::Midpoint => "midpoint",
            SolverType::Heun => "heun",
            SolverType::Bh1 => "bh1",
            SolverType::Bh2 => "bh2",
        }
    }

    /// The solver type diffusers names `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Midpoint, Self::Heun, Self::Bh1, Self::Bh2]
            .into_iter()
            .find(|s| s.name() == name)
    }
}
