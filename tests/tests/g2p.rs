//! Grapheme-to-phoneme: the CMU dictionary as shipped, the split and vocabulary, the batches, and the
//! evaluation (edit distance, word and phoneme error rates with alternates) on hand-worked cases.

use kiln_data::{load_cmudict, Collate, HostData};
use kiln_models::g2p::{edit_distance, error_rates, prepare, G2pEntry, PadPairs, EOS, PAD, SOS};

#[test]
fn the_dictionary_loads_with_its_alternates() {
    let dict = load_cmudict(None).unwrap();
    let entries: usize = dict.iter().map(|p| p.variants.len()).sum();
    assert_eq!(entries, 133_784, "every line of the shipped file");
    let a = dict.iter().find(|p| p.word == "a").unwrap();
    assert_eq!(a.variants, vec![vec!["AH0".to_string()], vec!["EY1".to_string()]], "A and A(1)");
    let aaronson = dict.iter().find(|p| p.word == "aaronson").unwrap();
    assert_eq!(aaronson.variants.len(), 2);
}

#[test]
fn the_split_is_by_word_and_strips_stress() {
    let dict = load_cmudict(None).unwrap();
    let (vocab, train, dev, test) = prepare(&dict, 500, 42).unwrap();
    assert_eq!(vocab.phonemes.len(), 39, "ARPAbet without stress: {:?}", vocab.phonemes);
    assert!(vocab.phonemes.iter().all(|p| !p.ends_with(|c: char| c.is_ascii_digit())));
    assert_eq!(vocab.letters.len(), 27, "a-z and the apostrophe: {:?}", vocab.letters);
    assert!((490..=500).contains(&dev.len()) && (490..=500).contains(&test.len()), "{} dev, {} test", dev.len(), test.len());
    let train_words: std::collections::HashSet<&str> = train.iter().map(|e| e.word.as_str()).collect();
    assert!(dev.iter().chain(&test).all(|e| !train_words.contains(e.word.as_str())), "no word in two splits");
    let (_, train2, _, test2) = prepare(&dict, 500, 42).unwrap();
    assert_eq!((train2.len(), test2[0].word.clone()), (train.len(), test[0].word.clone()), "the same seed, the same split");
}

#[test]
fn batches_pad_sources_and_shift_targets() {
    let arrays = PadPairs.collate(vec![(vec![5, 6, 7], vec![10, 11]), (vec![8], vec![12, 13, 14])]).unwrap();
    let get = |name: &str| match &arrays.iter().find(|a| a.name == name).unwrap().data {
        HostData::U32(v) => v.clone(),
        _ => panic!("{name} is not u32"),
    };
    assert_eq!(get("source"), vec![5, 6, 7, 8, PAD, PAD]);
    assert_eq!(get("source_lengths"), vec![3, 1]);
    assert_eq!(get("decoder_input"), vec![SOS, 10, 11, PAD, SOS, 12, 13, 14]);
    assert_eq!(get("targets"), vec![10, 11, EOS, PAD, 12, 13, 14, EOS]);
}

#[test]
fn error_rates_follow_their_definitions_on_hand_worked_cases() {
    // kitten -> sitting: substitute k/s, e/i, insert g.
    let ids = |s: &str| s.bytes().map(|b| b as u32).collect::<Vec<_>>();
    assert_eq!(edit_distance(&ids("kitten"), &ids("sitting")), 3);
    assert_eq!(edit_distance(&[], &ids("abc")), 3);
    assert_eq!(edit_distance(&ids("abc"), &ids("abc")), 0);
    let word = |variants: Vec<Vec<u32>>| G2pEntry { word: "w".into(), letters: vec![4], variants };
    // Word 1 has two pronunciations and the output is the second: right. Word 2's output is one edit from its
    // only pronunciation (3 phonemes): wrong, 1 phoneme error. Word 3 is missing both of its 2 phonemes.
    let words = vec![word(vec![vec![5, 6], vec![5, 7, 8]]), word(vec![vec![9, 10, 11]]), word(vec![vec![12, 13]])];
    let outputs = vec![vec![5, 7, 8], vec![9, 10, 12], vec![]];
    let (wer, per) = error_rates(&words, &outputs);
    assert!((wer - 2.0 / 3.0).abs() < 1e-12, "WER {wer}");
    // Edits 0 + 1 + 2 over reference lengths 3 (the nearest variant) + 3 + 2.
    assert!((per - 3.0 / 8.0).abs() < 1e-12, "PER {per}");
}

#[test]
fn the_transformer_ignores_padding_and_sees_no_future_phoneme() {
    use kiln_graph::Tensor;
    use kiln_models::g2p::{G2pTransformer, G2pVocab, G2P_TRANSFORMER};
    kiln_tests::require_gpu();
    let seed = kiln_tests::test_rng("g2p_transformer_padding").next_u64();
    let mut vs = kiln_nn::VarStore::new(seed);
    let vocab = G2pVocab { letters: ('a'..='z').collect(), phonemes: ["AA", "B", "K", "T"].map(String::from).to_vec() };
    let model = G2pTransformer::new(&mut vs, vocab, G2P_TRANSFORMER).unwrap();
    vs.finish().unwrap();
    // Word 0 has 3 letters, padded to 6 by word 1; alone it is 3 long.
    let both = Tensor::from_u32(&[5, 6, 7, 0, 0, 0, 8, 9, 10, 11, 12, 13], &[2, 6]).unwrap();
    let alone = Tensor::from_u32(&[5, 6, 7], &[1, 3]).unwrap();
    let input = Tensor::from_u32(&[SOS, 3, 4, SOS, 5, 6], &[2, 3]).unwrap();
    let logits = model.decode(&model.encode(&both, &[3, 6]).unwrap(), &input).unwrap().to_vec().unwrap();
    let single = model.decode(&model.encode(&alone, &[3]).unwrap(), &input.slice(0, 0, 1).unwrap()).unwrap().to_vec().unwrap();
    let v = single.len() / 3;
    let gap = logits[..3 * v].iter().zip(&single).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap < 1e-4, "padding changed word 0's logits by {gap}");
    // Changing the last phoneme input leaves the earlier positions' logits as they were (causal).
    let changed = Tensor::from_u32(&[SOS, 3, 6], &[1, 3]).unwrap();
    let other = model.decode(&model.encode(&alone, &[3]).unwrap(), &changed).unwrap().to_vec().unwrap();
    assert_eq!(other[..2 * v], single[..2 * v]);
    assert_ne!(other[2 * v..], single[2 * v..]);
    // A word longer than the positional table is an error saying so.
    let long = Tensor::from_u32(&[5; 65], &[1, 65]).unwrap();
    let err = model.encode(&long, &[65]).err().expect("65 letters").to_string();
    assert!(err.contains("65") && err.contains("64"), "{err}");
}
