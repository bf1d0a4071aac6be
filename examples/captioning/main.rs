//! Captioning synthetic scenes: a CNN encoder and an LSTM decoder with attention over the CNN's 4 x 4 grid
//! (kiln_models::scenes, the model `kiln train captioning` trains). BLEU-4 and exact match on 1,000 held-out
//! scenes; PNGs of scenes with the generated words' attention in runs/captioning-example.
//! `cargo run --release --example captioning [-- STEPS]`
use kiln_models::scenes::{caption_pictures, scene_sets, train_captioning, SceneConfig};

fn main() -> anyhow::Result<()> {
    let steps: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(SceneConfig::default().steps);
    let cfg = SceneConfig { steps, ..Default::default() };
    let (model, r) = train_captioning(&cfg, |_| {})?;
    println!("captioning on {}: {} steps in {:.0} s ({:.0} ms/step), {} parameters", r.adapter, r.steps, r.seconds, r.ms_per_step, r.parameters);
    println!("  {} held-out scenes: BLEU-4 {:.4}, exact match {:.1}%", r.test_scenes, r.bleu4, 100.0 * r.exact_match);
    for (truth, said) in r.examples.iter().take(5) {
        println!("  {}\n    {truth}\n    {said}", if truth == said { "right" } else { "WRONG" });
    }
    for line in caption_pictures(&model, &scene_sets(&cfg).1, 4, std::path::Path::new("runs/captioning-example"))? {
        println!("  {line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_models::scenes::{caption_pictures, scene_sets, train_captioning, SceneConfig};

    #[test]
    fn a_short_run_learns_to_caption_and_draws_attention() {
        let cfg = SceneConfig { steps: 300, test_scenes: 200, ..Default::default() };
        let (model, r) = train_captioning(&cfg, |_| {}).expect("training");
        eprintln!("captioning, 300 steps: BLEU-4 {:.3}, exact match {:.3}", r.bleu4, r.exact_match);
        assert!(r.bleu4 > 0.5, "BLEU-4 {:.3} after 150 steps", r.bleu4);
        let dir = std::env::temp_dir().join(format!("kiln-captioning-{}", std::process::id()));
        let lines = caption_pictures(&model, &scene_sets(&cfg).1, 2, &dir).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
