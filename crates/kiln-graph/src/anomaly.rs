//! Anomaly detection, in the spirit of PyTorch's `detect_anomaly`: while a watch is open on a thread, every
//! f32 tensor an op makes there is checked on the GPU for NaNs and infinities as it is made (one small kernel
//! per op, into one flag buffer per watch), and `end` names the first op, in recording order, whose output
//! held one: its kind (for a tensor made by a backward rule, the op whose rule it was) and its shape.
//!
//! Off by default and free when off (a thread-local check per tensor). The training loop opens a watch per
//! step when it is on for the device (`set_enabled`, or `KILN_ANOMALY=1` for every device; `kiln train
//! --anomaly`), and stops with the op's name instead of training on NaNs.

use std::cell::RefCell;

use kiln_wgpu::{BufView, Device, Gpu};

use crate::error::Result;
use crate::kernels::{self, Params};

/// Whether the training loop watches each step on `dev`.
pub fn enabled(dev: &Gpu) -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match dev.setting("anomaly") {
        Some(v) => v != 0,
        None => *ENV.get_or_init(|| std::env::var("KILN_ANOMALY").map(|v| v == "1" || v == "on").unwrap_or(false)),
    }
}

/// Turns anomaly detection on or off for the training loop on one device.
pub fn set_enabled(dev: &Gpu, on: bool) {
    dev.set_setting("anomaly", Some(on as u8));
}

struct Watch {
    device: Device,
    /// The smallest op number whose output held a NaN or an infinity (u32::MAX: none).
    flag: BufView,
    /// Op number - 1 -> what the op was.
    ops: Vec<String>,
}

thread_local! {
    static WATCH: RefCell<Option<Watch>> = const { RefCell::new(None) };
    /// What the tensors made now belong to, when they carry no op of their own (a backward rule's).
    static CONTEXT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Opens a watch on this thread for tensors made on `device` (a second `begin` starts a new one).
pub fn begin(device: &Device) -> Result<()> {
    let flag = device.upload(&u32::MAX.to_le_bytes(), "anomaly flag")?;
    WATCH.with(|w| *w.borrow_mut() = Some(Watch { device: device.clone(), flag, ops: Vec::new() }));
    Ok(())
}

/// Closes this thread's watch: the first op whose output held a NaN or an infinity, if any ("log -> [2, 3]").
/// Waits for the GPU to finish the watched work.
pub fn end() -> Result<Option<String>> {
    let Some(w) = WATCH.with(|w| w.borrow_mut().take()) else { return Ok(None) };
    let bytes = w.device.read(&w.flag)?;
    let first = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    Ok((first != u32::MAX).then(|| w.ops.get(first as usize - 1).cloned().unwrap_or_else(|| format!("op #{first}"))))
}

/// Runs `f` with `what` as the context of the tensors it makes without an op of their own.
pub(crate) fn in_context<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if WATCH.with(|w| w.borrow().is_none()) {
        return f();
    }
    let previous = CONTEXT.with(|c| c.replace(Some(what())));
    let out = f();
    CONTEXT.with(|c| *c.borrow_mut() = previous);
    out
}

/// Checks a new f32 tensor's values under an open watch on its device; `name` says what made it.
pub(crate) fn check(data: &BufView, shape: &[usize], name: impl FnOnce() -> Option<String>) -> Result<()> {
    WATCH.with(|w| {
        let mut w = w.borrow_mut();
        let Some(w) = w.as_mut().filter(|w| &w.device == data.device()) else { return Ok(()) };
        let n: usize = shape.iter().product();
        let what = match (name(), CONTEXT.with(|c| c.borrow().clone())) {
            (Some(op), Some(context)) => format!("{op} in {context}"),
            (Some(op), None) => op,
            (None, Some(context)) => context,
            (None, None) => "a tensor made outside the tape (an upload, or an op without a gradient)".into(),
        };
        w.ops.push(format!("{what} -> {shape:?}"));
        if n == 0 {
            return Ok(());
        }
        let view = data.sub(0, 4 * n as u64);
        let params = Params::new().u32(n).u32(w.ops.len());
        kernels::launch(&kernels::ANOMALY, "check_finite", &[], params, &[&view], &[&w.flag], kiln_wgpu::grid_1d(n as u64, 256))
    })
}
