//! Decoding: seeded temperature and top-k sampling, greedy decoding and beam search (which finds what greedy
//! misses), on hand-made distributions.

use kiln_graph::Rng;
use kiln_nn::decode::{argmax, beam_search, sample};

#[test]
fn sampling_follows_the_distribution_temperature_and_top_k() {
    let probs = [0.7f64, 0.2, 0.1];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let mut rng = Rng::new(9);
    let n = 20_000;
    let mut counts = [0usize; 3];
    for _ in 0..n {
        counts[sample(&logits, 1.0, None, &mut rng)] += 1;
    }
    for (c, p) in counts.iter().zip(probs) {
        assert!((*c as f64 / n as f64 - p).abs() < 0.02, "{counts:?}");
    }
    // Temperature 0 and top-1 are greedy; top-2 never draws the third token; the same seed, the same draws.
    assert_eq!(sample(&logits, 0.0, None, &mut rng), 0);
    assert!((0..200).all(|_| sample(&logits, 5.0, Some(1), &mut rng) == 0));
    assert!((0..2000).all(|_| sample(&logits, 1.0, Some(2), &mut rng) != 2));
    let draws = |seed| {
        let mut r = Rng::new(seed);
        (0..50).map(|_| sample(&logits, 0.8, Some(3), &mut r)).collect::<Vec<_>>()
    };
    assert_eq!(draws(4), draws(4));
    // A high temperature flattens the distribution.
    let mut hot = [0usize; 3];
    for _ in 0..n {
        hot[sample(&logits, 100.0, None, &mut rng)] += 1;
    }
    assert!(hot.iter().all(|&c| (c as f64 / n as f64 - 1.0 / 3.0).abs() < 0.03), "{hot:?}");
    assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1, "ties go to the first");
}

/// A toy model over {0: <eos>, 1: a, 2: b}: first a (0.6) or b (0.4); after a, <eos> 0.4 (a, b 0.3 each);
/// after b, <eos> 0.9; later, <eos> 0.5.
fn toy(prefixes: &[Vec<u32>]) -> kiln_graph::Result<Vec<Vec<f32>>> {
    Ok(prefixes
        .iter()
        .map(|p| {
            let probs: [f64; 3] = match p.as_slice() {
                [] => [1e-9, 0.6, 0.4],
                [1] => [0.4, 0.3, 0.3],
                [2] => [0.9, 0.05, 0.05],
                _ => [0.5, 0.25, 0.25],
            };
            probs.iter().map(|q| q.ln() as f32).collect()
        })
        .collect())
}

#[test]
fn beam_search_finds_the_sequence_greedy_misses() {
    // Greedy (width 1): a then <eos>, probability 0.24; the best sequence is b <eos>, 0.36.
    let greedy = beam_search(1, 5, 0, 0.0, toy).unwrap();
    assert_eq!(greedy[0].tokens, [1, 0]);
    let beams = beam_search(2, 5, 0, 0.0, toy).unwrap();
    assert_eq!(beams[0].tokens, [2, 0]);
    assert!((beams[0].log_prob - 0.36f64.ln()).abs() < 1e-6, "{}", beams[0].log_prob);
    assert!(beams[0].finished);
    assert_eq!(beams[1].tokens, [1, 0], "the runner-up");
    assert!(beams.windows(2).all(|w| w[0].score(0.0) >= w[1].score(0.0)));
}

#[test]
fn greedy_batch_stops_each_sequence_at_its_end_and_feeds_back_its_tokens() {
    use kiln_nn::decode::greedy_batch;
    // Vocabulary of 4 (0 ends); sequence 0 writes 3, 2, then ends; sequence 1 writes 1 five times (max_len 5).
    let mut fed: Vec<Vec<u32>> = Vec::new();
    let out = greedy_batch(
        2,
        4,
        5,
        9,
        |id| id == 0,
        |input| {
            fed.push(input.to_vec());
            let t = fed.len();
            let pick = |id: usize| -> Vec<f32> { (0..4).map(|j| if j == id { 1.0 } else { 0.0 }).collect() };
            let first = match t {
                1 => 3,
                2 => 2,
                _ => 0,
            };
            Ok([pick(first), pick(1)].concat())
        },
    )
    .unwrap();
    assert_eq!(out, vec![vec![3, 2], vec![1, 1, 1, 1, 1]]);
    assert_eq!(fed[0], vec![9, 9], "the start token first");
    assert_eq!(fed[1], vec![3, 1], "then each sequence's last token");
    assert_eq!(fed.len(), 5, "until max_len, since sequence 1 never ends");
}
