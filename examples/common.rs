//! What every example shares: run a training configuration and print one line per epoch (every `every`
//! epochs) — the examples read like lessons, not like a CLI.

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

use kiln_models::{Progress, TrainConfig, TrainReport};

/// Trains `cfg`, printing the epoch records every `every` epochs.
pub fn train_verbose(cfg: &TrainConfig, every: usize) -> anyhow::Result<TrainReport> {
    let report = kiln_models::run(cfg, |p: &Progress| {
        if let Some(r) = &p.epoch_end {
            if r.epoch == 1 || r.epoch % every.max(1) == 0 || r.epoch == p.epochs {
                println!("epoch {:>4}/{}  train loss {:>10.4}  dev loss {:>10.4}  dev metric {:.4}", r.epoch, p.epochs, r.train_loss, r.dev_loss, r.dev_metric);
            }
        }
    })?;
    let submits = report.submits_per_step.map(|v| format!("{v:.2}")).unwrap_or_else(|| "(not measured)".into());
    println!("adapter: {} — {:.2} s, {:.2} ms/step, {submits} submits/step", report.adapter, report.seconds, report.ms_per_step);
    Ok(report)
}
