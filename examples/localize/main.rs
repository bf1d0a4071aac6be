//! Classification with localisation on scenes of one real object or none (kiln_models::localize): presence,
//! class and box accuracy on held-out scenes, and a PNG of truth beside prediction in
//! runs/localize-example.
//! `cargo run --release --example localize [-- STEPS [mixed|squared]]`
use kiln_models::localize::{localize_pictures, train_localizer, LocalizeConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let d = LocalizeConfig::default();
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(d.steps);
    let loss = args.next().unwrap_or_else(|| "mixed".into()).parse().map_err(anyhow::Error::msg)?;
    let cfg = LocalizeConfig { steps, loss, ..d };
    let (model, r) = train_localizer(&cfg, |step, loss| {
        if step % 250 == 0 {
            eprintln!("step {step}: loss {loss:.4}");
        }
    })?;
    println!("{:?} loss, {} steps ({:.0} ms/step, {} parameters): loss {:.3} -> {:.3}", r.loss, r.steps, r.ms_per_step, r.parameters, r.first_loss, r.last_loss);
    println!(
        "{} held-out scenes: presence {:.3}; with an object: class {:.3}, mean IoU {:.3}, class right and IoU >= 0.5 {:.3}",
        r.test_scenes, r.presence_accuracy, r.class_accuracy, r.mean_iou, r.correct_localization
    );
    let out = std::path::Path::new("runs/localize-example");
    std::fs::create_dir_all(out)?;
    localize_pictures(&model, &cfg, 6, &out.join("scenes.png"))?;
    println!("picture {}", out.join("scenes.png").display());
    Ok(())
}
