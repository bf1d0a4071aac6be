//! Any data set, batched: the [`Dataset`] trait (a length and a sample by index, any sample kind), the sample
//! kinds the course's models train on, [`Collate`] (samples -> one [`HostBatch`] of named arrays) and the
//! [`DataLoader`] (seeded shuffling per epoch, drop-last, background worker threads, batches in the same order
//! whatever the number of workers). A `HostBatch` goes to the GPU in one write ([`HostBatch::upload`]).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_graph::{DType, KilnError, Tensor};

use crate::dataset::{ArrayDataset, Targets};
use crate::error::{DataError, Result};

/// A data set: `len` samples, each fetched by index. Implement it for any sample kind; `get` runs on the
/// loader's worker threads.
pub trait Dataset: Send + Sync + 'static {
    type Sample: Send + 'static;
    fn len(&self) -> usize;
    fn get(&self, index: usize) -> Result<Self::Sample>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One row of an [`ArrayDataset`]: its features and its class or value.
#[derive(Clone, Debug, PartialEq)]
pub struct Labeled {
    pub x: Vec<f32>,
    pub target: Target,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    Class(u32),
    Value(f32),
}

/// An image with a variable number of objects: boxes (x1, y1, x2, y2 in pixels, torchvision's convention),
/// their classes and, optionally, one binary mask per object ([h, w], row-major, 0 or 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// [c, h, w], row-major.
    pub image: Vec<f32>,
    pub shape: [usize; 3],
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<u32>,
    pub masks: Option<Vec<Vec<u8>>>,
}

/// A token sequence and, for language models and taggers, its targets (same length).
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub targets: Option<Vec<u32>>,
}

/// Two samples and whether they match (siamese nets).
#[derive(Clone, Debug, PartialEq)]
pub struct Pair<S> {
    pub a: S,
    pub b: S,
    pub same: bool,
}

/// Anchor, positive, negative (triplet loss).
#[derive(Clone, Debug, PartialEq)]
pub struct Triplet<S> {
    pub anchor: S,
    pub positive: S,
    pub negative: S,
}

impl Dataset for ArrayDataset {
    type Sample = Labeled;
    fn len(&self) -> usize {
        ArrayDataset::len(self)
    }
    fn get(&self, i: usize) -> Result<Labeled> {
        if i >= ArrayDataset::len(self) {
            return Err(DataError::Invalid(format!("{}: sample {i} of {}", self.name, ArrayDataset::len(self))));
        }
        let target = match &self.targets {
            Targets::Classes { labels, names } if labels[i] as usize >= names.len() => {
                return Err(DataError::Invalid(format!("{}: sample {i} has label {}, but there are {} classes", self.name, labels[i], names.len())));
            }
            Targets::Classes { labels, .. } => Target::Class(labels[i]),
            Targets::Values(v) => Target::Value(v[i]),
        };
        Ok(Labeled { x: self.row(i).to_vec(), target })
    }
}

/// The values of one array of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

/// One named array of a batch, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostArray {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostArray {
    pub fn f32(name: &'static str, shape: Vec<usize>, data: Vec<f32>) -> HostArray {
        HostArray { name, shape, data: HostData::F32(data) }
    }
    pub fn u32(name: &'static str, shape: Vec<usize>, data: Vec<u32>) -> HostArray {
        HostArray { name, shape, data: HostData::U32(data) }
    }
}

/// A collated batch: its samples' indices in the data set and its arrays, in the collator's order.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub indices: Vec<usize>,
    pub arrays: Vec<HostArray>,
}

impl HostBatch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
    /// The array called `name`.
    pub fn array(&self, name: &str) -> Option<&HostArray> {
        self.arrays.iter().find(|a| a.name == name)
    }
    /// Samples `rows` of the batch (every array cut along its first axis): a data-parallel replica's shard.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> HostBatch {
        let n = self.len().max(1);
        let arrays = self
            .arrays
            .iter()
            .map(|a| {
                let mut shape = a.shape.clone();
                let per = |len: usize| len / n;
                let data = match &a.data {
                    HostData::F32(v) => HostData::F32(v[rows.start * per(v.len())..rows.end * per(v.len())].to_vec()),
                    HostData::U32(v) => HostData::U32(v[rows.start * per(v.len())..rows.end * per(v.len())].to_vec()),
                };
                if let Some(first) = shape.first_mut() {
                    *first = rows.len();
                }
                HostArray { name: a.name, shape, data }
            })
            .collect();
        HostBatch { indices: self.indices[rows].to_vec(), arrays }
    }
    /// Every array as a tensor on the thread's current device, in order, with one allocation and one write.
    pub fn upload(&self) -> std::result::Result<Vec<Tensor>, KilnError> {
        self.upload_on(&kiln_graph::backend::Device::current()?)
    }
    /// [`HostBatch::upload`] onto `device`.
    pub fn upload_on(&self, device: &kiln_graph::backend::Device) -> std::result::Result<Vec<Tensor>, KilnError> {
        let parts: Vec<(&[u8], &[usize], DType)> = self
            .arrays
            .iter()
            .map(|a| match &a.data {
                HostData::F32(v) => (bytemuck::cast_slice(v), &a.shape[..], DType::F32),
                HostData::U32(v) => (bytemuck::cast_slice(v), &a.shape[..], DType::U32),
            })
            .collect();
        Tensor::upload_together_on(device, &parts)
    }
}

/// Turns a batch's samples into arrays.
pub trait Collate<S>: Send + Sync + 'static {
    fn collate(&self, samples: Vec<S>) -> Result<Vec<HostArray>>;
}

impl<S, F: Fn(Vec<S>) -> Result<Vec<HostArray>> + Send + Sync + 'static> Collate<S> for F {
    fn collate(&self, samples: Vec<S>) -> Result<Vec<HostArray>> {
        self(samples)
    }
}

/// Rows stacked: "x" f32 [n, features] (or [n, c, h, w] with `image`), then "labels" u32 [n] for classes or
/// "values" f32 [n, 1] for regression targets.
#[derive(Clone, Copy, Debug, Default)]
pub struct StackRows {
    pub image: Option<[usize; 3]>,
}

impl Collate<Labeled> for StackRows {
    fn collate(&self, samples: Vec<Labeled>) -> Result<Vec<HostArray>> {
        let n = samples.len();
        let features = samples.first().map(|s| s.x.len()).unwrap_or(0);
        let mut x = Vec::with_capacity(n * features);
        for (i, s) in samples.iter().enumerate() {
            if s.x.len() != features {
                return Err(DataError::Invalid(format!("collate: sample {i} has {} features, sample 0 has {features}", s.x.len())));
            }
            x.extend_from_slice(&s.x);
        }
        let x_shape = match self.image {
            Some([c, h, w]) if c * h * w == features => vec![n, c, h, w],
            Some(img) => return Err(DataError::Invalid(format!("collate: image shape {img:?} does not hold {features} features"))),
            None => vec![n, features],
        };
        let target = match samples.first().map(|s| s.target) {
            Some(Target::Value(_)) => {
                let v = samples
                    .iter()
                    .map(|s| if let Target::Value(v) = s.target { Ok(v) } else { Err(DataError::Invalid("collate: classes and values mixed in one batch".into())) })
                    .collect::<Result<_>>()?;
                HostArray::f32("values", vec![n, 1], v)
            }
            _ => {
                let v = samples
                    .iter()
                    .map(|s| if let Target::Class(c) = s.target { Ok(c) } else { Err(DataError::Invalid("collate: classes and values mixed in one batch".into())) })
                    .collect::<Result<_>>()?;
                HostArray::u32("labels", vec![n], v)
            }
        };
        Ok(vec![HostArray::f32("x", x_shape, x), target])
    }
}

/// Sequences padded to the batch's longest: "tokens" u32 [n, max_len] (`pad` after the end), "lengths" u32
/// [n], and "targets" u32 [n, max_len] when the samples have targets (padded with `pad` too).
#[derive(Clone, Copy, Debug, Default)]
pub struct PadSequences {
    pub pad: u32,
}

impl Collate<Sequence> for PadSequences {
    fn collate(&self, samples: Vec<Sequence>) -> Result<Vec<HostArray>> {
        let n = samples.len();
        let max_len = samples.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let padded = |v: &[u32]| v.iter().copied().chain(std::iter::repeat(self.pad)).take(max_len).collect::<Vec<u32>>();
        let tokens: Vec<u32> = samples.iter().flat_map(|s| padded(&s.tokens)).collect();
        let lengths = samples.iter().map(|s| s.tokens.len() as u32).collect();
        let mut arrays = vec![HostArray::u32("tokens", vec![n, max_len], tokens), HostArray::u32("lengths", vec![n], lengths)];
        if samples.iter().any(|s| s.targets.is_some()) {
            let mut targets = Vec::with_capacity(n * max_len);
            for (i, s) in samples.iter().enumerate() {
                match &s.targets {
                    Some(t) if t.len() == s.tokens.len() => targets.extend(padded(t)),
                    _ => return Err(DataError::Invalid(format!("collate: sequence {i} has {} tokens and {:?} targets", s.tokens.len(), s.targets.as_ref().map(|t| t.len())))),
                }
            }
            arrays.push(HostArray::u32("targets", vec![n, max_len], targets));
        }
        Ok(arrays)
    }
}

/// Images stacked, objects concatenated: "images" f32 [n, c, h, w], "boxes" f32 [objects, 4], "labels" u32
/// [objects], "batch_index" u32 [objects] (which image each object is in: the layout torchvision's
/// `roi_align` takes its boxes in), and "masks" f32 [objects, h, w] when every sample has masks.
#[derive(Clone, Copy, Debug, Default)]
pub struct StackDetections;

impl Collate<Detection> for StackDetections {
    fn collate(&self, samples: Vec<Detection>) -> Result<Vec<HostArray>> {
        let shape = samples.first().map(|s| s.shape).unwrap_or([0, 0, 0]);
        let (mut images, mut boxes, mut labels, mut batch_index, mut masks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let with_masks = !samples.is_empty() && samples.iter().all(|s| s.masks.is_some());
        for (i, s) in samples.iter().enumerate() {
            if s.shape != shape || s.image.len() != shape.iter().product::<usize>() {
                return Err(DataError::Invalid(format!("collate: image {i} is {:?} with {} values, image 0 is {shape:?}", s.shape, s.image.len())));
            }
            if s.boxes.len() != s.labels.len() {
                return Err(DataError::Invalid(format!("collate: image {i} has {} boxes and {} labels", s.boxes.len(), s.labels.len())));
            }
            images.extend_from_slice(&s.image);
            boxes.extend(s.boxes.iter().flatten());
            labels.extend_from_slice(&s.labels);
            batch_index.extend(std::iter::repeat_n(i as u32, s.boxes.len()));
            if let (true, Some(m)) = (with_masks, &s.masks) {
                if m.len() != s.boxes.len() || m.iter().any(|m| m.len() != shape[1] * shape[2]) {
                    return Err(DataError::Invalid(format!("collate: image {i} needs {} masks of {}x{}", s.boxes.len(), shape[1], shape[2])));
                }
                masks.extend(m.iter().flatten().map(|&v| v as f32));
            }
        }
        let objects = labels.len();
        let mut arrays = vec![
            HostArray::f32("images", vec![samples.len(), shape[0], shape[1], shape[2]], images),
            HostArray::f32("boxes", vec![objects, 4], boxes),
            HostArray::u32("labels", vec![objects], labels),
            HostArray::u32("batch_index", vec![objects], batch_index),
        ];
        if with_masks {
            arrays.push(HostArray::f32("masks", vec![objects, shape[1], shape[2]], masks));
        }
        Ok(arrays)
    }
}

/// Pairs: the inner collator's arrays for the `a`s, then the same arrays for the `b`s, then "same" f32 [n]
/// (1 for a match).
#[derive(Clone, Copy, Debug, Default)]
pub struct StackPairs<C>(pub C);

impl<S: Send + 'static, C: Collate<S>> Collate<Pair<S>> for StackPairs<C> {
    fn collate(&self, samples: Vec<Pair<S>>) -> Result<Vec<HostArray>> {
        let same = samples.iter().map(|p| p.same as u32 as f32).collect::<Vec<f32>>();
        let n = samples.len();
        let (a, b): (Vec<S>, Vec<S>) = samples.into_iter().map(|p| (p.a, p.b)).unzip();
        let mut arrays = self.0.collate(a)?;
        arrays.extend(self.0.collate(b)?);
        arrays.push(HostArray::f32("same", vec![n], same));
        Ok(arrays)
    }
}

/// Triplets: the inner collator's arrays for the anchors, then the positives, then the negatives.
#[derive(Clone, Copy, Debug, Default)]
pub struct StackTriplets<C>(pub C);

impl<S: Send + 'static, C: Collate<S>> Collate<Triplet<S>> for StackTriplets<C> {
    fn collate(&self, samples: Vec<Triplet<S>>) -> Result<Vec<HostArray>> {
        let mut anchors = Vec::with_capacity(samples.len());
        let (mut positives, mut negatives) = (Vec::with_capacity(samples.len()), Vec::with_capacity(samples.len()));
        for t in samples {
            anchors.push(t.anchor);
            positives.push(t.positive);
            negatives.push(t.negative);
        }
        let mut arrays = self.0.collate(anchors)?;
        arrays.extend(self.0.collate(positives)?);
        arrays.extend(self.0.collate(negatives)?);
        Ok(arrays)
    }
}

/// How a [`DataLoader`] batches.
#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Shuffle each epoch with a seed made from this one and the epoch number (None: data set order).
    pub shuffle: Option<u64>,
    /// Leave out a last batch shorter than `batch_size`.
    pub drop_last: bool,
    /// Background threads fetching and collating (at least 1).
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub prefetch: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions { batch_size: 32, shuffle: None, drop_last: false, workers: 1, prefetch: 2 }
    }
}

/// Batches of a [`Dataset`], collated on background threads. Batch `i` of an epoch is made by worker
/// `i % workers` and handed out in order, so the batches are the same whatever the number of workers.
pub struct DataLoader<D: Dataset, C: Collate<D::Sample>> {
    dataset: Arc<D>,
    collate: Arc<C>,
    options: LoaderOptions,
}

impl<D: Dataset, C: Collate<D::Sample>> DataLoader<D, C> {
    pub fn new(dataset: D, collate: C, options: LoaderOptions) -> Result<DataLoader<D, C>> {
        DataLoader::shared(Arc::new(dataset), collate, options)
    }

    /// A loader over a data set shared with others (a train split read by two loaders, say).
    pub fn shared(dataset: Arc<D>, collate: C, options: LoaderOptions) -> Result<DataLoader<D, C>> {
        if options.batch_size == 0 || options.workers == 0 {
            return Err(DataError::Invalid(format!("DataLoader: batch_size ({}) and workers ({}) must be at least 1", options.batch_size, options.workers)));
        }
        Ok(DataLoader { dataset, collate: Arc::new(collate), options })
    }

    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.options.batch_size);
        if self.options.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sample order of `epoch`: shuffled with seed `shuffle * 1_000_003 + epoch` (the training loop's
    /// formula, so `kiln train` batches exactly as before), cut into batches.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let seed = self.options.shuffle.map(|s| s.wrapping_mul(1_000_003).wrapping_add(epoch));
        let batches = crate::prep::Batches::new(self.dataset.len(), self.options.batch_size, seed).expect("batch size checked in new");
        batches.filter(|b| !self.options.drop_last || b.len() == self.options.batch_size).collect()
    }

    /// One epoch's batches, fetched and collated ahead on the workers.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The epoch's batches after its first `skip` (a run resumed in the middle of an epoch).
    pub fn epoch_from(&self, epoch: u64, skip: usize) -> Epoch {
        let plan: Vec<Vec<usize>> = self.batch_indices(epoch).into_iter().skip(skip).collect();
        let workers = self.options.workers.min(plan.len()).max(1);
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.options.prefetch.max(1));
            let mine: Vec<Vec<usize>> = plan.iter().skip(w).step_by(workers).cloned().collect();
            let (dataset, collate) = (self.dataset.clone(), self.collate.clone());
            handles.push(std::thread::spawn(move || {
                for indices in mine {
                    let batch = indices.iter().map(|&i| dataset.get(i)).collect::<Result<Vec<_>>>().and_then(|samples| collate.collate(samples)).map(|arrays| HostBatch { indices, arrays });
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            }));
            receivers.push(rx);
        }
        Epoch { receivers, handles, next: 0, total: plan.len(), failed: false }
    }
}

/// An epoch in progress: an iterator of collated batches (an error ends it).
pub struct Epoch {
    receivers: Vec<Receiver<Result<HostBatch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
    failed: bool,
}

impl Iterator for Epoch {
    type Item = Result<HostBatch>;
    fn next(&mut self) -> Option<Result<HostBatch>> {
        if self.next >= self.total || self.failed {
            return None;
        }
        let worker = self.next % self.receivers.len();
        self.next += 1;
        let got = self.receivers[worker].recv().unwrap_or_else(|_| Err(DataError::Invalid("a DataLoader worker stopped (it panicked)".into())));
        self.failed = got.is_err();
        Some(got)
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Closing the channels stops the workers at their next send.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
