//! The text corpora, the character vocabulary and next-character windows (the sequence models' data).

use kiln_data::{load_first_names, load_moby_dick, split_tail, split_words, CharVocab, CharWindows, DataLoader, Dataset, HostData, LoaderOptions, PadSequences, StreamWindows, WordSequences};

#[test]
fn moby_dick_and_the_names_load_as_shipped() {
    let text = load_moby_dick(None).unwrap();
    assert_eq!(text.chars().count(), 1_190_317);
    assert!(text.starts_with("CHAPTER 1. Loomings.\n\nCall me Ishmael."));
    let vocab = CharVocab::from_text(&text);
    assert_eq!(vocab.len(), 4 + 83, "83 distinct characters and the four special tokens");
    let (train, held_out) = split_tail(&text, 0.05).unwrap();
    assert_eq!(held_out.chars().count(), (1_190_317f64 * 0.05).round() as usize);
    assert_eq!(format!("{train}{held_out}"), text);
    assert!(held_out.ends_with("five thousand years ago.\n"));
    let names = load_first_names(None).unwrap();
    assert_eq!(names.len(), 4951 + 3898);
    assert_eq!(names[0], "Aaren");
}

#[test]
fn the_vocabulary_encodes_decodes_and_round_trips() {
    let vocab = CharVocab::from_text("hello, world");
    assert_eq!(vocab.len(), 4 + 9);
    let ids = vocab.encode("hold");
    assert!(ids.iter().all(|&i| i >= 4));
    assert_eq!(vocab.decode(&ids).unwrap(), "hold");
    // Unknown characters: <unk> when encoding text, an error naming the character for a prompt.
    assert_eq!(vocab.encode("hz")[1], CharVocab::UNK);
    let err = vocab.encode_strict("hz").unwrap_err().to_string();
    assert!(err.contains("'z'") && err.contains("at 1"), "{err}");
    // Specials are left out of decoded text; ids beyond the vocabulary are an error.
    assert_eq!(vocab.decode(&[CharVocab::SOS, ids[0], CharVocab::EOS, CharVocab::PAD]).unwrap(), "h");
    assert!(vocab.decode(&[99]).unwrap_err().to_string().contains("token 99"));
    let path = std::env::temp_dir().join(format!("kiln-vocab-{}.json", std::process::id()));
    vocab.save(&path).unwrap();
    assert_eq!(CharVocab::load(&path).unwrap(), vocab);
    std::fs::write(&path, r#"{"specials": ["<pad>"], "chars": "ab"}"#).unwrap();
    let err = CharVocab::load(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("special tokens"), "{err}");
    std::fs::remove_file(&path).ok();
}

#[test]
fn windows_predict_the_next_character_and_batch_with_padding() {
    let vocab = CharVocab::from_text("abcdefghij");
    let windows = CharWindows::new(vocab.encode("abcdefghij"), 3).unwrap();
    assert_eq!(Dataset::len(&windows), 3, "9 shifted pairs make three windows of 3");
    let s = windows.get(1).unwrap();
    assert_eq!(vocab.decode(&s.tokens).unwrap(), "def");
    assert_eq!(vocab.decode(s.targets.as_ref().unwrap()).unwrap(), "efg");
    assert!(windows.get(3).is_err());
    assert!(CharWindows::new(vocab.encode("ab"), 3).is_err());
    let loader = DataLoader::new(windows, PadSequences { pad: CharVocab::PAD }, LoaderOptions { batch_size: 2, ..Default::default() }).unwrap();
    let batch = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(batch.array("tokens").unwrap().shape, [2, 3]);
    assert_eq!(batch.array("lengths").unwrap().data, HostData::U32(vec![3, 3]));
}

#[test]
fn ngram_baselines_follow_their_definition() {
    use kiln_models::lm::ngram_nats;
    // Unigram, add-1, over a 3-character alphabet {a, b, c}: p(a) = (2 + 1) / (3 + 3), p(c) = (0 + 1) / 6.
    let got = ngram_nats("aab", "ac", 1, 1.0);
    let want = -((3.0f64 / 6.0).ln() + (1.0f64 / 6.0).ln()) / 2.0;
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    // A bigram model of a text that always alternates predicts it almost exactly.
    let text = "ab".repeat(500);
    assert!(ngram_nats(&text, "abababab", 2, 0.01) < 0.01);
}

#[test]
fn words_split_by_seed_without_overlap_and_become_sos_eos_sequences() {
    let names = load_first_names(None).unwrap();
    let (train, held) = split_words(&names, 0.1, 42).unwrap();
    let distinct: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(train.len() + held.len(), distinct.len(), "every distinct name once");
    assert_eq!(held.len(), (distinct.len() as f64 * 0.1).round() as usize);
    let train_set: std::collections::HashSet<&String> = train.iter().collect();
    assert!(held.iter().all(|w| !train_set.contains(w)), "no name in both splits");
    assert_eq!(split_words(&names, 0.1, 42).unwrap(), (train.clone(), held.clone()), "the same seed, the same split");
    assert_ne!(split_words(&names, 0.1, 43).unwrap().1, held, "another seed, another split");
    assert!(split_words(&names, 1.0, 42).is_err());

    let vocab = CharVocab::from_text("Anab");
    let words = WordSequences::new(&["Ana".to_string(), "Bab".to_string()], &vocab).unwrap();
    let s = words.get(0).unwrap();
    let ids = vocab.encode("Ana");
    assert_eq!(s.tokens, [vec![CharVocab::SOS], ids.clone()].concat());
    assert_eq!(s.targets.unwrap(), [ids, vec![CharVocab::EOS]].concat());
    assert!(WordSequences::new(&["".to_string()], &vocab).is_err());
}

#[test]
fn stream_windows_continue_each_row_from_batch_to_batch() {
    // 2 streams of 10 tokens each (21 tokens), windows of 3: 3 windows per stream.
    let tokens: Vec<u32> = (0..21).collect();
    let w = StreamWindows::new(tokens, 2, 3).unwrap();
    assert_eq!((w.len(), w.windows_per_stream()), (6, 3));
    // Batch k = samples 2k (stream 0) and 2k + 1 (stream 1): stream 0 is tokens 0-8, stream 1 tokens 9-17.
    let rows: Vec<Vec<u32>> = (0..6).map(|i| w.get(i).unwrap().tokens).collect();
    assert_eq!(rows, vec![vec![0, 1, 2], vec![9, 10, 11], vec![3, 4, 5], vec![12, 13, 14], vec![6, 7, 8], vec![15, 16, 17]]);
    assert_eq!(w.get(1).unwrap().targets.unwrap(), vec![10, 11, 12]);
    assert!(StreamWindows::new((0..5).collect(), 2, 3).is_err(), "too short for 2 streams of 3");
}
