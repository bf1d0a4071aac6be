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
