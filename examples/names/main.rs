//! A first-name generator: Embedding -> GRU -> Linear (kiln_models::names, the model `kiln train names`
//! trains) on whole names, `<sos> name` -> `name <eos>`, from a seeded 90/10 split of the shipped name lists.
//! Reports the held-out names' loss in nats per character beside an add-k trigram, then samples 1,000 names
//! (seeded, all at once as one batch) and counts how many are new.
//! `cargo run --release --example names [-- STEPS]`
use kiln_models::names::{train_names, NamesConfig};

fn main() -> anyhow::Result<()> {
    let steps: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1500);
    let r = train_names(&NamesConfig { steps, ..Default::default() }, |_| {})?;
    println!("{} steps in {:.0} s ({:.1} ms/step), {} training names, {} held out", r.steps, r.seconds, r.ms_per_step, r.train_names, r.held_out_names);
    println!("held-out loss {:.3} nats/char ({:.3} bits/char); add-k trigram {:.3}", r.held_out_nats_per_char, r.held_out_bits_per_char, r.trigram_nats_per_char);
    println!("{} samples: {:.1}% new, {:.1}% real held-out names, {:.1}% distinct", r.samples, 100.0 * r.new_share, 100.0 * r.held_out_share, 100.0 * r.distinct_share);
    println!("some: {}", r.examples.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_models::names::{train_names, NamesConfig};

    #[test]
    fn a_short_run_learns_names_and_samples_new_ones() {
        let cfg = NamesConfig { steps: 150, samples: 200, ..Default::default() };
        let r = train_names(&cfg, |_| {}).expect("training");
        // A uniform guess over the ~55 symbols is 4.0 nats; the trigram about 2.3.
        assert!(r.held_out_nats_per_char < 2.4, "held-out {:.3} nats/char after 150 steps", r.held_out_nats_per_char);
        assert!(r.new_share > 0.3 && r.distinct_share > 0.5, "samples: {:.2} new, {:.2} distinct: {:?}", r.new_share, r.distinct_share, r.examples);
        assert!(r.examples.iter().all(|n| n.chars().count() <= 24));
        let again = train_names(&cfg, |_| {}).expect("training again");
        assert_eq!(r.examples, again.examples, "the same seed, the same names");
    }
}
