//! kiln-nn: parameters in one flat GPU buffer, modules, initialisers, optimizers, LR schedules and metrics.

pub mod init;
pub mod metrics;
pub mod module;
pub mod optim;
pub mod schedule;
pub mod varstore;

pub use init::Init;
pub use module::{Activation, Linear, Module, Sequential};
pub use optim::{Optimizer, OptimizerKind};
pub use schedule::LrSchedule;
pub use varstore::{Param, VarStore};
