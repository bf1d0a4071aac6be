//! Grapheme-to-phoneme on the CMU Pronouncing Dictionary: an encoder-decoder LSTM with Luong attention, the
//! same model without attention, and a Transformer encoder-decoder (kiln_models::g2p, the models `kiln train
//! g2p [--no-attention | --transformer]` trains). Word and phoneme
//! error rates on held-out words, greedy and with beam search; attention maps as PNGs in runs/g2p-example.
//! `cargo run --release --example g2p [-- STEPS]`
use kiln_models::g2p::{attention_maps, train_g2p, G2pConfig, G2pShape, G2P_TRANSFORMER};

fn main() -> anyhow::Result<()> {
    let steps: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2500);
    for (attention, transformer) in [(true, None), (false, None), (true, Some(G2P_TRANSFORMER))] {
        let d = if transformer.is_some() { G2pConfig::transformer() } else { G2pConfig::default() };
        let cfg = G2pConfig { shape: G2pShape { attention, transformer, ..d.shape }, steps, ..d };
        let (model, r, words) = train_g2p(&cfg, |_| {})?;
        println!("{}: {} steps in {:.0} s ({:.0} ms/step), {} parameters", r.model, r.steps, r.seconds, r.ms_per_step, r.parameters);
        println!("  {} test words greedy: WER {:.1}%, PER {:.1}%", r.test_words, 100.0 * r.greedy_wer, 100.0 * r.greedy_per);
        println!("  first {} with beam {}: WER {:.1}%, PER {:.1}% (greedy there: WER {:.1}%)", r.beam_words, r.beam_width, 100.0 * r.beam_wer, 100.0 * r.beam_per, 100.0 * r.greedy_wer_on_beam_words);
        for (w, p) in r.examples.iter().take(5) {
            println!("  {w:<16} {p}");
        }
        if attention && transformer.is_none() {
            let outputs = model.greedy(&words.iter().take(4).collect::<Vec<_>>(), 30)?;
            for line in attention_maps(model.as_ref(), &words, &outputs, 4, std::path::Path::new("runs/g2p-example"))? {
                println!("  attention map {line}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_models::g2p::{attention_maps, train_g2p, G2pConfig, G2pShape, G2P_TRANSFORMER};

    #[test]
    fn a_short_run_learns_pronunciations_and_draws_attention() {
        let cfg = G2pConfig { steps: 150, batch_size: 64, lr: 2e-3, eval_words: 300, beam_words: 40, held: 300, ..Default::default() };
        let (model, r, words) = train_g2p(&cfg, |_| {}).expect("training");
        eprintln!("g2p, 150 steps: greedy WER {:.3} PER {:.3}; beam WER {:.3} PER {:.3}", r.greedy_wer, r.greedy_per, r.beam_wer, r.beam_per);
        assert!(r.greedy_per < 0.45, "phoneme error rate {:.3} after 150 steps", r.greedy_per);
        assert!(r.beam_per <= r.greedy_per + 0.1, "beam {:.3} against greedy {:.3}", r.beam_per, r.greedy_per);
        let dir = std::env::temp_dir().join(format!("kiln-g2p-maps-{}", std::process::id()));
        let outputs = model.greedy(&words.iter().take(2).collect::<Vec<_>>(), 30).unwrap();
        let maps = attention_maps(model.as_ref(), &words, &outputs, 2, &dir).unwrap();
        assert_eq!(maps.len(), 2);
        assert!(std::fs::read_dir(&dir).unwrap().count() == 2);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_short_transformer_run_learns_pronunciations() {
        let shape = G2pShape { transformer: Some(G2P_TRANSFORMER), ..G2pConfig::default().shape };
        let cfg = G2pConfig { shape, steps: 150, batch_size: 64, lr: 1e-3, eval_words: 300, beam_words: 40, held: 300, ..Default::default() };
        let (model, r, words) = train_g2p(&cfg, |_| {}).expect("training");
        eprintln!("g2p transformer, 150 steps: greedy WER {:.3} PER {:.3}; beam WER {:.3} PER {:.3}", r.greedy_wer, r.greedy_per, r.beam_wer, r.beam_per);
        assert!(r.greedy_per < 0.6, "phoneme error rate {:.3} after 150 steps", r.greedy_per);
        assert!(r.beam_per <= r.greedy_per + 0.1, "beam {:.3} against greedy {:.3}", r.beam_per, r.greedy_per);
        let outputs = model.greedy(&words.iter().take(3).collect::<Vec<_>>(), 30).unwrap();
        assert!(outputs.iter().all(|o| !o.is_empty() && o.len() <= 30));
    }
}
