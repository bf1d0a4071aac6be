//! The Dataset trait and DataLoader: every sample once per epoch, the same batches whatever the number of
//! workers, seeded shuffles, drop-last, the collators (rows, padded sequences, detections with masks, pairs,
//! triplets), errors that name the sample, and one buffer per uploaded batch.

use std::sync::Arc;

use kiln_data::{
    ArrayDataset, Collate, DataError, DataLoader, Dataset, Detection, HostData, Labeled, LoaderOptions, PadSequences, Pair, Sequence, StackDetections, StackPairs, StackRows, StackTriplets, Target,
    Targets, Triplet,
};
use kiln_tests::require_gpu;

fn table(n: usize) -> ArrayDataset {
    ArrayDataset {
        name: "table".into(),
        x: (0..n * 3).map(|v| v as f32).collect(),
        features: 3,
        targets: Targets::Classes { labels: (0..n as u32).map(|i| i % 4).collect(), names: (0..4).map(|i| i.to_string()).collect() },
        image: None,
    }
}

fn epoch_indices<D: Dataset, C: Collate<D::Sample>>(loader: &DataLoader<D, C>, epoch: u64) -> Vec<Vec<usize>> {
    loader.epoch(epoch).map(|b| b.expect("batch").indices).collect()
}

#[test]
fn every_sample_once_per_epoch_in_the_same_order_whatever_the_workers() {
    let data = Arc::new(table(103));
    let opts = |workers| LoaderOptions { batch_size: 10, shuffle: Some(42), drop_last: false, workers, prefetch: 2 };
    let one = DataLoader::shared(data.clone(), StackRows::default(), opts(1)).unwrap();
    let three = DataLoader::shared(data.clone(), StackRows::default(), opts(3)).unwrap();
    assert_eq!(one.len(), 11);
    let e0 = epoch_indices(&one, 0);
    assert_eq!(e0, epoch_indices(&three, 0), "batches depend on the number of workers");
    assert_eq!(e0.len(), 11);
    assert_eq!(e0.last().unwrap().len(), 3);
    let mut all: Vec<usize> = e0.concat();
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());
    assert_ne!(e0, epoch_indices(&one, 1), "each epoch reshuffles");
    assert_eq!(e0, epoch_indices(&one, 0), "the same seed and epoch give the same order");
    assert_ne!(e0.concat(), (0..103).collect::<Vec<_>>(), "shuffled");

    let in_order = DataLoader::shared(data.clone(), StackRows::default(), LoaderOptions { batch_size: 10, drop_last: true, workers: 2, ..Default::default() }).unwrap();
    let batches = epoch_indices(&in_order, 0);
    assert_eq!((in_order.len(), batches.len()), (10, 10));
    assert_eq!(batches.concat(), (0..100).collect::<Vec<_>>());
}

#[test]
fn rows_collate_to_features_and_targets() {
    let data = table(5);
    let loader = DataLoader::new(data, StackRows::default(), LoaderOptions { batch_size: 2, ..Default::default() }).unwrap();
    let first = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(first.array("x").unwrap().shape, [2, 3]);
    assert_eq!(first.array("x").unwrap().data, HostData::F32(vec![0., 1., 2., 3., 4., 5.]));
    assert_eq!(first.array("labels").unwrap().data, HostData::U32(vec![0, 1]));
    let values = vec![Labeled { x: vec![1.0; 4], target: Target::Value(0.5) }, Labeled { x: vec![2.0; 4], target: Target::Value(-1.0) }];
    let arrays = StackRows { image: Some([1, 2, 2]) }.collate(values).unwrap();
    assert_eq!((arrays[0].shape.clone(), arrays[1].name, arrays[1].shape.clone()), (vec![2, 1, 2, 2], "values", vec![2, 1]));
    let ragged = vec![Labeled { x: vec![1.0; 4], target: Target::Class(0) }, Labeled { x: vec![2.0; 3], target: Target::Class(1) }];
    let err = StackRows::default().collate(ragged).unwrap_err().to_string();
    assert!(err.contains("sample 1 has 3 features"), "{err}");
}

#[test]
fn sequences_pad_to_the_longest_with_lengths() {
    let seqs = vec![Sequence { tokens: vec![5, 6, 7], targets: Some(vec![6, 7, 1]) }, Sequence { tokens: vec![9], targets: Some(vec![1]) }];
    let a = PadSequences { pad: 0 }.collate(seqs).unwrap();
    assert_eq!((a[0].name, a[0].shape.clone(), a[0].data.clone()), ("tokens", vec![2, 3], HostData::U32(vec![5, 6, 7, 9, 0, 0])));
    assert_eq!(a[1].data, HostData::U32(vec![3, 1]));
    assert_eq!(a[2].data, HostData::U32(vec![6, 7, 1, 1, 0, 0]));
    let bad = vec![Sequence { tokens: vec![1, 2], targets: Some(vec![1]) }];
    assert!(PadSequences::default().collate(bad).unwrap_err().to_string().contains("sequence 0"));
}

#[test]
fn detections_concatenate_objects_with_their_image_index_and_masks() {
    let image = |v: f32, boxes: usize| Detection {
        image: vec![v; 2 * 2 * 3],
        shape: [2, 2, 3],
        boxes: (0..boxes).map(|b| [b as f32, 0.0, b as f32 + 1.0, 2.0]).collect(),
        labels: (0..boxes as u32).collect(),
        masks: Some((0..boxes).map(|b| vec![(b % 2) as u8; 6]).collect()),
    };
    let a = StackDetections.collate(vec![image(1.0, 2), image(2.0, 0), image(3.0, 1)]).unwrap();
    let names: Vec<&str> = a.iter().map(|x| x.name).collect();
    assert_eq!(names, ["images", "boxes", "labels", "batch_index", "masks"]);
    assert_eq!(a[0].shape, [3, 2, 2, 3]);
    assert_eq!(a[1].shape, [3, 4]);
    assert_eq!(a[3].data, HostData::U32(vec![0, 0, 2]));
    assert_eq!(a[4].shape, [3, 2, 3]);
    let mut bad = image(1.0, 2);
    bad.labels.pop();
    assert!(StackDetections.collate(vec![bad]).unwrap_err().to_string().contains("2 boxes and 1 labels"));
}

#[test]
fn pairs_and_triplets_stack_each_member() {
    let s = |v: f32| Labeled { x: vec![v; 2], target: Target::Class(v as u32) };
    let pairs = StackPairs(StackRows::default()).collate(vec![Pair { a: s(1.0), b: s(2.0), same: false }, Pair { a: s(3.0), b: s(3.0), same: true }]).unwrap();
    assert_eq!(pairs.len(), 5);
    assert_eq!((pairs[0].data.clone(), pairs[2].data.clone()), (HostData::F32(vec![1., 1., 3., 3.]), HostData::F32(vec![2., 2., 3., 3.])));
    assert_eq!(pairs[4].data, HostData::F32(vec![0.0, 1.0]));
    let triplets = StackTriplets(StackRows::default()).collate(vec![Triplet { anchor: s(1.0), positive: s(1.5), negative: s(4.0) }]).unwrap();
    assert_eq!(triplets.len(), 6);
    assert_eq!(triplets[4].data, HostData::F32(vec![4.0, 4.0]));
}

/// A data set whose sample 7 cannot be read.
struct Flaky;

impl Dataset for Flaky {
    type Sample = Labeled;
    fn len(&self) -> usize {
        20
    }
    fn get(&self, i: usize) -> kiln_data::Result<Labeled> {
        if i == 7 {
            return Err(DataError::Corrupt { file: "flaky.bin".into(), problem: format!("sample {i} is truncated") });
        }
        Ok(Labeled { x: vec![i as f32], target: Target::Class(0) })
    }
}

#[test]
fn a_bad_sample_is_an_error_naming_it_and_ends_the_epoch() {
    let loader = DataLoader::new(Flaky, StackRows::default(), LoaderOptions { batch_size: 4, workers: 2, ..Default::default() }).unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 2, "batch 0 fine, batch 1 (samples 4..8) fails, then the epoch ends");
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("flaky.bin") && err.contains("sample 7"), "{err}");
    // An epoch dropped half way stops its workers (this returns).
    let mut partial = DataLoader::new(table(1000), StackRows::default(), LoaderOptions { batch_size: 1, workers: 3, prefetch: 1, ..Default::default() }).unwrap().epoch(0);
    assert!(partial.next().unwrap().is_ok());
    drop(partial);
    assert!(DataLoader::new(table(3), StackRows::default(), LoaderOptions { batch_size: 0, ..Default::default() }).is_err());
}

#[test]
fn a_label_out_of_range_is_an_error_naming_the_sample() {
    let mut data = table(6);
    if let Targets::Classes { labels, .. } = &mut data.targets {
        labels[4] = 7;
    }
    let loader = DataLoader::new(data, StackRows::default(), LoaderOptions { batch_size: 3, ..Default::default() }).unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    let err = results[1].as_ref().expect_err("the second batch holds sample 4").to_string();
    assert!(err.contains("sample 4") && err.contains("label 7") && err.contains("4 classes"), "{err}");
}

#[test]
fn a_batch_uploads_into_one_buffer() {
    require_gpu();
    let loader = DataLoader::new(table(9), StackRows::default(), LoaderOptions { batch_size: 4, ..Default::default() }).unwrap();
    let batch = loader.epoch(0).next().unwrap().unwrap();
    let t = batch.upload().unwrap();
    assert_eq!((t[0].shape(), t[1].shape()), (&[4, 3][..], &[4][..]));
    assert!(Arc::ptr_eq(&t[0].storage().buffer, &t[1].storage().buffer), "features and labels share one buffer (one write)");
    assert_eq!(t[0].to_vec().unwrap(), (0..12).map(|v| v as f32).collect::<Vec<_>>());
    assert_eq!(t[1].to_vec_u32().unwrap(), [0, 1, 2, 3]);
}
