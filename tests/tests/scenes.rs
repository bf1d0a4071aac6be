//! The synthetic scenes (captioning and VQA data): determinism, layout, pictures that show what the captions
//! say, answers re-derived from the objects, balanced kinds; batches; corpus BLEU against NLTK's.

use kiln_data::{Collate, CollateCaptions, CollateQuestions, Dataset, HostData, SceneQuestions, SceneVocab, Scenes, COLOURS, SCENE_COLUMNS, SCENE_EOS, SCENE_SIZE, SCENE_SOS, SCENE_UNK, SHAPES};
use kiln_models::scenes::corpus_bleu;
use kiln_tests::test_rng;

#[test]
fn scenes_are_seeded_laid_out_in_columns_and_drawn_as_captioned() {
    let seed = test_rng("scenes_layout").next_u64();
    let set = Scenes::new(seed, 400);
    assert_eq!(set.scene(7).unwrap(), Scenes::new(seed, 9).scene(7).unwrap(), "scene i depends on the seed and i only");
    assert_ne!(set.scene(7).unwrap(), Scenes::new(seed ^ 1, 9).scene(7).unwrap());
    assert!(set.scene(400).is_err(), "an index past the end is an error");
    let mut counts = [0usize; 5];
    let n = SCENE_SIZE * SCENE_SIZE;
    for i in 0..set.len {
        let s = set.scene(i).unwrap();
        counts[s.objects.len()] += 1;
        assert_eq!(s.image.len(), 3 * n);
        assert!(s.image.iter().all(|v| (0.0..=1.0).contains(v)));
        let cols: Vec<usize> = s.objects.iter().map(|o| o.column).collect();
        assert!(cols.windows(2).all(|w| w[0] < w[1]) && cols.iter().all(|&c| c < SCENE_COLUMNS), "columns {cols:?}");
        for (a, o) in s.objects.iter().enumerate() {
            assert!(s.objects[a + 1..].iter().all(|p| (p.shape, p.colour) != (o.shape, o.colour)), "two {} in one scene", o.name());
            // The pixel at the centre has the object's colour (within the jitter), not the background.
            let (x, y) = (o.cx as usize, o.cy as usize);
            let rgb: Vec<f32> = (0..3).map(|c| s.image[c * n + y * SCENE_SIZE + x]).collect();
            let want = [[0.9, 0.15, 0.15], [0.15, 0.75, 0.2], [0.2, 0.3, 0.95], [0.95, 0.9, 0.15], [0.95, 0.95, 0.95]][o.colour];
            assert!(rgb.iter().zip(want).all(|(g, w)| (g - w).abs() <= 0.051), "scene {i}: {} drawn as {rgb:?}", o.name());
        }
        let words: Vec<String> = s.objects.iter().map(|o| format!("a {} {}", COLOURS[o.colour], SHAPES[o.shape])).collect();
        assert_eq!(s.caption(), words.join(" left of "));
    }
    assert_eq!(counts[0] + counts[1], 0);
    assert!(counts[2..].iter().all(|&c| c > 80), "2, 3 and 4 shapes about equally often: {counts:?}");
}

#[test]
fn every_answer_follows_from_the_objects_and_kinds_are_balanced() {
    let seed = test_rng("scenes_questions").next_u64();
    let set = Scenes::new(seed, 1000);
    let vocab = SceneVocab::default();
    let (mut kinds, mut yes) = ([0usize; 5], [0usize; 5]);
    for i in 0..set.len {
        let (s, q) = set.scene_question(i).unwrap();
        assert_eq!(s, set.scene(i).unwrap(), "a question's scene is the captioning scene of that index");
        kinds[q.kind] += 1;
        yes[q.kind] += (q.answer == "yes") as usize;
        let w: Vec<&str> = q.text.split(' ').collect();
        let find = |c: &str, sh: &str| s.objects.iter().position(|o| COLOURS[o.colour] == c && SHAPES[o.shape] == sh);
        let want = match q.kind {
            0 => {
                let matching: Vec<_> = s.objects.iter().filter(|o| SHAPES[o.shape] == w[4]).collect();
                assert_eq!(matching.len(), 1, "{}: the shape must name one object", q.text);
                COLOURS[matching[0].colour].to_string()
            }
            1 => {
                let matching: Vec<_> = s.objects.iter().filter(|o| COLOURS[o.colour] == w[4]).collect();
                assert_eq!(matching.len(), 1, "{}: the colour must name one object", q.text);
                SHAPES[matching[0].shape].to_string()
            }
            2 => ["two", "three", "four"][s.objects.len() - 2].to_string(),
            3 => if find(w[3], w[4]).is_some() { "yes" } else { "no" }.to_string(),
            _ => {
                let (a, b) = (find(w[2], w[3]).expect("first object"), find(w[7], w[8]).expect("second object"));
                assert_ne!(a, b);
                if a < b { "yes" } else { "no" }.to_string()
            }
        };
        assert_eq!(q.answer, want, "scene {i}: {}", q.text);
        assert!(!vocab.encode(&q.text).contains(&SCENE_UNK), "{}", q.text);
        assert!(vocab.answer_id(&q.answer).is_some());
        assert!(!vocab.encode(&s.caption()).contains(&SCENE_UNK));
        assert_eq!(vocab.decode(&vocab.encode(&s.caption())), s.caption());
    }
    assert!(kinds.iter().all(|&k| k >= 150), "each kind about a fifth: {kinds:?}");
    for k in [3, 4] {
        // Binomial(about 200, 1/2): the window is 5.7 standard deviations wide each side.
        let share = yes[k] as f64 / kinds[k] as f64;
        assert!((0.3..=0.7).contains(&share), "kind {k}: {share:.2} of answers are yes");
    }
}

#[test]
fn caption_and_question_batches_are_padded_and_shifted() {
    let set = Scenes::new(3, 8);
    let samples: Vec<_> = (0..3).map(|i| set.get(i).unwrap()).collect();
    let lens: Vec<usize> = samples.iter().map(|s| s.1.len()).collect();
    let t = lens.iter().max().unwrap() + 1;
    let arrays = CollateCaptions.collate(samples.clone()).unwrap();
    assert_eq!(arrays[0].shape, vec![3, 3, SCENE_SIZE, SCENE_SIZE]);
    assert_eq!((arrays[1].shape.clone(), arrays[2].shape.clone()), (vec![3, t], vec![3, t]));
    let (HostData::U32(input), HostData::U32(targets)) = (&arrays[1].data, &arrays[2].data) else { panic!("u32 arrays") };
    for (i, (_, words)) in samples.iter().enumerate() {
        assert_eq!(input[i * t], SCENE_SOS);
        assert_eq!(&input[i * t + 1..i * t + 1 + words.len()], &words[..]);
        assert_eq!(&targets[i * t..i * t + words.len()], &words[..]);
        assert_eq!(targets[i * t + words.len()], SCENE_EOS);
        assert!(targets[i * t + words.len() + 1..(i + 1) * t].iter().all(|&v| v == 0));
    }
    let qs = SceneQuestions(set);
    let samples: Vec<_> = (0..4).map(|i| qs.get(i).unwrap()).collect();
    let arrays = CollateQuestions.collate(samples.clone()).unwrap();
    let HostData::U32(lengths) = &arrays[2].data else { panic!("lengths") };
    assert_eq!(lengths, &samples.iter().map(|s| s.1.len() as u32).collect::<Vec<_>>());
    assert_eq!(arrays[3].shape, vec![4]);
}

#[test]
fn corpus_bleu_matches_nltk() {
    // Each value is nltk.translate.bleu_score.corpus_bleu(references, hypotheses) (NLTK 3.10, default
    // uniform weights, no smoothing) on the same token lists.
    type Case = (Vec<Vec<u32>>, Vec<Vec<Vec<u32>>>, f64);
    let cases: Vec<Case> = vec![
        (vec![vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10]], vec![vec![vec![1, 2, 3, 4, 5, 7]], vec![vec![7, 8, 9, 10, 11], vec![7, 8, 9]]], 0.837592239708627),
        // Clipping: a repeated word counts at most as often as in the reference.
        (vec![vec![1, 1, 1, 1, 2, 3], vec![4, 5, 6, 7, 8]], vec![vec![vec![1, 1, 1, 2, 3, 1, 1]], vec![vec![4, 5, 6, 7, 8, 9, 9, 9]]], 0.6325728283189326),
        // The brevity penalty against the closest reference length.
        (vec![vec![1, 2, 3, 4, 5]], vec![vec![vec![1, 2, 3, 4, 5, 6, 7], vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 9]]], 0.6703200460356393),
        // n-gram counts are summed over the corpus; the short hypothesis has no 3- or 4-grams of its own and,
        // as in NLTK, still adds 1 to their denominators.
        (vec![vec![1, 2, 3, 4], vec![1, 2]], vec![vec![vec![1, 2, 3, 4]], vec![vec![1, 2, 3]]], 0.6431870218238024),
    ];
    for (hyps, refs, want) in cases {
        let got = corpus_bleu(&hyps, &refs, 4);
        assert!((got - want).abs() < 1e-12, "BLEU {got} against NLTK's {want} for {hyps:?}");
    }
    let same = vec![vec![5, 6, 7, 8, 9]];
    assert_eq!(corpus_bleu(&same, std::slice::from_ref(&same), 4), 1.0);
    assert_eq!(corpus_bleu(&[vec![1, 2, 3]], &[vec![vec![4, 5, 6, 7]]], 4), 0.0, "no matching n-gram of some order gives 0");
}
