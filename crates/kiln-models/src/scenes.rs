//! `captioning` and `vqa` on the synthetic scenes (kiln_data::Scenes): 2-4 coloured shapes on a 32 x 32 canvas.
//!
//! Both read the picture with the same small CNN, three 3x3 "same" convolutions (16, 32, 64 channels) each
//! followed by ReLU and 2x2 max pooling: a 4 x 4 grid of 64 features, one column of the grid per column of the
//! canvas.
//!
//! - **Captioning** (Show, Attend and Tell, with Luong's attention): the flattened grid sets the LSTM decoder's
//!   initial state (h0 = tanh(W_h f), c0 = tanh(W_c f)); each decoder state h_t attends over the 16 grid cells
//!   (score h_t W_a f_s), h~ = tanh(W [context; h_t]) feeds the word classifier. Teacher forcing in training;
//!   greedy decoding to `<eos>` at test time; BLEU-4 (corpus, Papineni et al.) and the exact-match rate.
//! - **VQA**: an LSTM reads the question. Its final state u0 attends over the grid cells (each with a learned
//!   embedding of its place added) twice, a stacked-attention network (Yang et al. 2016): u_k = tanh(W_k [u_{k-1};
//!   context_k]), context_k = attention of u_{k-1} over the cells (Luong's general score). Beside it, Antol et
//!   al.'s fusion of the whole picture: the flattened grid and u0, each through a linear layer and ReLU,
//!   multiplied element by element. [u_2; fusion] goes through a hidden layer to the answer classifier.
//!   Accuracy overall and per question kind.

use std::time::Instant;

use kiln_data::{
    CollateCaptions, CollateQuestions, DataLoader, HostBatch, HostData, LoaderOptions, SceneQuestions, SceneVocab, Scenes, QUESTION_KINDS, SCENE_EOS, SCENE_PAD, SCENE_SIZE, SCENE_SOS, SCENE_UNK,
};
use kiln_graph::backend::Device;
use kiln_graph::{loss, no_grad, KilnError, Pool2dGeom, Result, Tensor};
use kiln_nn::{CellKind, Conv2d, Conv2dConfig, Embedding, Init, Layer, Linear, Module, MultiplicativeAttention, Optimizer, Padding, Param, Rnn, RnnConfig, RnnState, VarStore};
use serde::Serialize;

use crate::trainer::Progress;

fn data_err(e: kiln_data::DataError) -> KilnError {
    KilnError::Data(e.to_string())
}

/// Channels of the CNN's grid, and its side.
pub const GRID_CHANNELS: usize = 64;
pub const GRID: usize = SCENE_SIZE / 8;

/// The CNN both models read pictures with (names `{name}.conv1`..`conv3`).
pub struct SceneEncoder {
    pub convs: Vec<Conv2d>,
}

impl SceneEncoder {
    pub fn new(vs: &mut VarStore, name: &str) -> Result<SceneEncoder> {
        let same = Conv2dConfig { padding: Padding::Same, ..Default::default() };
        let convs = [(3, 16), (16, 32), (32, GRID_CHANNELS)].iter().enumerate().map(|(i, &(a, b))| Conv2d::new(vs, &format!("{name}.conv{}", i + 1), a, b, 3, same)).collect::<Result<_>>()?;
        Ok(SceneEncoder { convs })
    }

    /// images [n, 3, 32, 32] -> the grid [n, 64, 4, 4].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?.max_pool2d(Pool2dGeom::square(2))?.0;
        }
        Ok(x)
    }
}

impl Module for SceneEncoder {
    fn describe(&self) -> String {
        "SceneEncoder(3 -> 16 -> 32 -> 64, 4 x 4 grid)".into()
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.convs.iter().enumerate().map(|(i, c)| (format!("conv{}", i + 1), c as &dyn Module)).collect()
    }
}

/// The grid as attention sees it, [n, 16, 64] (cells row by row), and flattened, [n, 1024].
fn grid_views(grid: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = grid.shape()[0];
    let cells = grid.reshape(&[n, GRID_CHANNELS, GRID * GRID])?.transpose(1, 2)?;
    Ok((cells, grid.reshape(&[n, GRID_CHANNELS * GRID * GRID])?))
}

fn words_of(vocab: &SceneVocab) -> usize {
    vocab.words.len()
}

/// Sizes of a [`Captioner`].
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct CaptionShape {
    pub dim: usize,
    pub hidden: usize,
}

/// The captioning model (names `encoder`, `words`, `init_h`, `init_c`, `decoder`, `attn`, `combine`, `out`).
pub struct Captioner {
    pub vocab: SceneVocab,
    pub shape: CaptionShape,
    pub encoder: SceneEncoder,
    pub words: Embedding,
    pub init_h: Linear,
    pub init_c: Linear,
    pub decoder: Rnn,
    pub attn: MultiplicativeAttention,
    pub combine: Linear,
    pub out: Linear,
}

/// A batch of pictures as the decoder needs them: the grid cells [n, 16, 64], their keys through W_a
/// [n, 16, H] and the decoder's initial state.
pub struct EncodedScenes {
    pub cells: Tensor,
    pub keys: Tensor,
    pub init: RnnState,
}

impl Captioner {
    pub fn new(vs: &mut VarStore, shape: CaptionShape) -> Result<Captioner> {
        let vocab = SceneVocab::default();
        let (v, h, flat) = (words_of(&vocab), shape.hidden, GRID_CHANNELS * GRID * GRID);
        Ok(Captioner {
            encoder: SceneEncoder::new(vs, "encoder")?,
            words: Embedding::new(vs, "words", v, shape.dim, Some(SCENE_PAD as usize))?,
            init_h: Linear::new(vs, "init_h", flat, h, Init::XavierUniform)?,
            init_c: Linear::new(vs, "init_c", flat, h, Init::XavierUniform)?,
            decoder: Rnn::new(vs, "decoder", CellKind::Lstm, shape.dim, h, RnnConfig { batch_first: true, ..Default::default() })?,
            attn: MultiplicativeAttention::general(vs, "attn", h, GRID_CHANNELS)?,
            combine: Linear::new(vs, "combine", GRID_CHANNELS + h, h, Init::XavierUniform)?,
            out: Linear::new(vs, "out", h, v, Init::XavierUniform)?,
            vocab,
            shape,
        })
    }

    /// images [n, 3, 32, 32] -> what the decoder needs.
    pub fn encode(&self, images: &Tensor) -> Result<EncodedScenes> {
        let n = images.shape()[0];
        let (cells, flat) = grid_views(&self.encoder.forward(images)?)?;
        let state = |l: &Linear| -> Result<Tensor> { l.forward(&flat)?.tanh()?.reshape(&[1, n, self.shape.hidden]) };
        let init = RnnState { h: state(&self.init_h)?, c: Some(state(&self.init_c)?) };
        Ok(EncodedScenes { keys: self.attn.project_keys(&cells)?, cells, init })
    }

    /// Decoder inputs [n, T] from `state` -> (logits [n * T, words], the state after them).
    pub fn decode(&self, enc: &EncodedScenes, input: &Tensor, state: &RnnState) -> Result<(Tensor, RnnState)> {
        let (n, t, h) = (input.shape()[0], input.shape()[1], self.shape.hidden);
        let (dec, state) = self.decoder.forward(&self.words.forward_ids(input)?, Some(state))?;
        let context = self.attn.context(&dec, &enc.keys, &enc.cells, None)?;
        let both = Tensor::concat(&[&context, &dec], 2)?.reshape(&[n * t, GRID_CHANNELS + h])?;
        Ok((self.out.forward(&self.combine.forward(&both)?.tanh()?)?, state))
    }

    /// The mean cross-entropy of a collated batch (padding ignored).
    pub fn batch_loss(&self, batch: &HostBatch) -> Result<Tensor> {
        let t = batch.upload()?;
        let enc = self.encode(&t[0])?;
        let (logits, _) = self.decode(&enc, &t[1], &enc.init)?;
        let opts = loss::CrossEntropyOptions { ignore_index: Some(SCENE_PAD), label_smoothing: 0.0 };
        loss::cross_entropy_with(&logits, &t[2].reshape(&[t[2].numel()])?, opts)
    }

    /// Greedy captions of images [n, 3, 32, 32], at most `max_len` words each (`<eos>` left out).
    pub fn greedy(&self, images: &Tensor, max_len: usize) -> Result<Vec<Vec<u32>>> {
        no_grad(|| {
            let n = images.shape()[0];
            let enc = self.encode(images)?;
            let mut state = enc.init.clone();
            kiln_nn::decode::greedy_batch(
                n,
                words_of(&self.vocab),
                max_len,
                SCENE_SOS,
                |id| id == SCENE_EOS || id <= SCENE_UNK,
                |input| {
                    let (logits, next) = self.decode(&enc, &Tensor::from_u32(input, &[n, 1])?, &state)?;
                    state = next;
                    logits.to_vec()
                },
            )
        })
    }

    /// The attention weights [T, 16] of one picture [1, 3, 32, 32] while it writes `words` (then `<eos>`).
    pub fn attention_weights(&self, image: &Tensor, words: &[u32]) -> Result<Vec<f32>> {
        no_grad(|| {
            let enc = self.encode(image)?;
            let input: Vec<u32> = std::iter::once(SCENE_SOS).chain(words.iter().copied()).collect();
            let (dec, _) = self.decoder.forward(&self.words.forward_ids(&Tensor::from_u32(&input, &[1, input.len()])?)?, Some(&enc.init))?;
            self.attn.weights(&dec, &enc.keys, None)?.to_vec()
        })
    }
}

impl Module for Captioner {
    fn describe(&self) -> String {
        format!("Captioner(dim={}, hidden={})", self.shape.dim, self.shape.hidden)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("encoder".into(), &self.encoder),
            ("words".into(), &self.words),
            ("init_h".into(), &self.init_h),
            ("init_c".into(), &self.init_c),
            ("decoder".into(), &self.decoder),
            ("attn".into(), &self.attn),
            ("combine".into(), &self.combine),
            ("out".into(), &self.out),
        ]
    }
}

/// Corpus BLEU (Papineni et al. 2002) exactly as NLTK's `corpus_bleu` computes it (uniform weights, no
/// smoothing): clipped n-gram counts for n = 1..`max_n` summed over the corpus, their precisions' geometric
/// mean, times the brevity penalty exp(1 - r / c) where the hypotheses' total length c is under r, the summed
/// lengths of each hypothesis's closest reference (the shorter on a tie). 0 when any precision is 0. As in
/// NLTK, a hypothesis too short to have n-grams of some order adds 1 to that order's denominator (sacreBLEU
/// adds 0); the two agree whenever every hypothesis has at least `max_n` tokens.
pub fn corpus_bleu(hypotheses: &[Vec<u32>], references: &[Vec<Vec<u32>>], max_n: usize) -> f64 {
    use std::collections::HashMap;
    let (mut matched, mut total) = (vec![0usize; max_n], vec![0usize; max_n]);
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    for (hyp, refs) in hypotheses.iter().zip(references) {
        hyp_len += hyp.len();
        ref_len += refs.iter().map(|r| r.len()).min_by_key(|&l| (l.abs_diff(hyp.len()), l)).unwrap_or(0);
        for n in 1..=max_n {
            let grams = |s: &[u32]| -> HashMap<Vec<u32>, usize> {
                let mut m = HashMap::new();
                for g in s.windows(n) {
                    *m.entry(g.to_vec()).or_insert(0) += 1;
                }
                m
            };
            let h = grams(hyp);
            let mut most: HashMap<Vec<u32>, usize> = HashMap::new();
            for r in refs {
                for (g, c) in grams(r) {
                    let e = most.entry(g).or_insert(0);
                    *e = (*e).max(c);
                }
            }
            matched[n - 1] += h.iter().map(|(g, &c)| c.min(most.get(g).copied().unwrap_or(0))).sum::<usize>();
            total[n - 1] += hyp.len().saturating_sub(n - 1).max(1);
        }
    }
    if hyp_len == 0 || matched.contains(&0) {
        return 0.0;
    }
    let log_precision = matched.iter().zip(&total).map(|(&m, &t)| (m as f64 / t as f64).ln()).sum::<f64>() / max_n as f64;
    let brevity = if hyp_len < ref_len { 1.0 - ref_len as f64 / hyp_len as f64 } else { 0.0 };
    (log_precision + brevity).exp()
}

/// What `kiln train captioning` and `kiln train vqa` set (one config, each reads its part).
#[derive(Clone, Debug)]
pub struct SceneConfig {
    pub dim: usize,
    pub hidden: usize,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub seed: u64,
    /// Held-out scenes the run is scored on (generated from a seed the training scenes never use).
    pub test_scenes: usize,
}

impl Default for SceneConfig {
    fn default() -> Self {
        SceneConfig { dim: 32, hidden: 128, batch_size: 64, steps: 1500, lr: 3e-3, seed: 42, test_scenes: 1000 }
    }
}

/// The training scenes of a run (as many as its steps draw) and its held-out ones: seeds 2 s and 2 s + 1.
pub fn scene_sets(cfg: &SceneConfig) -> (Scenes, Scenes) {
    let train = (cfg.steps as usize * cfg.batch_size).max(cfg.batch_size);
    (Scenes::new(cfg.seed.wrapping_mul(2), train), Scenes::new(cfg.seed.wrapping_mul(2).wrapping_add(1), cfg.test_scenes))
}

fn optimizer(vs: &VarStore, cfg: &SceneConfig) -> Result<Optimizer> {
    crate::trainer::adam_cosine(vs, cfg.lr, cfg.steps, Some(5.0))
}

/// What a captioning run measured.
#[derive(Clone, Debug, Serialize)]
pub struct CaptionReport {
    pub adapter: String,
    pub shape: CaptionShape,
    pub steps: u64,
    pub train_scenes: usize,
    pub test_scenes: usize,
    pub bleu4: f64,
    pub exact_match: f64,
    /// (reference, generated) for the first ten test scenes.
    pub examples: Vec<(String, String)>,
    pub parameters: usize,
    pub seconds: f64,
    pub ms_per_step: f64,
}

/// Pictures [n, 3, 32, 32] of scenes `range` of `set`.
fn images_of(set: &Scenes, range: std::ops::Range<usize>) -> Result<Tensor> {
    let n = range.len();
    let mut px = Vec::with_capacity(n * 3 * SCENE_SIZE * SCENE_SIZE);
    for i in range {
        px.extend(set.scene(i).map_err(data_err)?.image);
    }
    Tensor::from_slice(&px, &[n, 3, SCENE_SIZE, SCENE_SIZE])
}

/// Greedy captions of every scene of `set` (word ids), with BLEU-4 and the exact-match rate against the
/// true captions.
pub fn evaluate_captions(model: &Captioner, set: &Scenes) -> Result<(Vec<Vec<u32>>, f64, f64)> {
    let mut outputs = Vec::with_capacity(set.len);
    for start in (0..set.len).step_by(250) {
        outputs.extend(model.greedy(&images_of(set, start..(start + 250).min(set.len))?, 24)?);
    }
    let truth: Vec<Vec<u32>> = (0..set.len).map(|i| set.scene(i).map(|s| model.vocab.encode(&s.caption()))).collect::<kiln_data::Result<_>>().map_err(data_err)?;
    let exact = outputs.iter().zip(&truth).filter(|(a, b)| a == b).count() as f64 / set.len.max(1) as f64;
    let refs: Vec<Vec<Vec<u32>>> = truth.into_iter().map(|t| vec![t]).collect();
    Ok((outputs.clone(), corpus_bleu(&outputs, &refs, 4), exact))
}

/// Trains the captioner with teacher forcing on fresh scenes and scores it on held-out ones.
pub fn train_captioning(cfg: &SceneConfig, progress: impl FnMut(&Progress)) -> Result<(Captioner, CaptionReport)> {
    let started = Instant::now();
    let device = Device::current()?;
    let (train, test) = scene_sets(cfg);
    let mut vs = VarStore::new(cfg.seed);
    let model = Captioner::new(&mut vs, CaptionShape { dim: cfg.dim, hidden: cfg.hidden })?;
    vs.finish()?;
    let mut opt = optimizer(&vs, cfg)?;
    let options = LoaderOptions { batch_size: cfg.batch_size, shuffle: Some(cfg.seed), drop_last: true, ..Default::default() };
    let loader = DataLoader::new(train.clone(), CollateCaptions, options).map_err(data_err)?;
    let fit = crate::trainer::fit_steps(&loader, cfg.steps, cfg.lr, started, progress, &mut opt, &vs, |b| model.batch_loss(b))?;
    let (outputs, bleu4, exact_match) = evaluate_captions(&model, &test)?;
    let examples = (0..10.min(test.len)).map(|i| Ok((test.scene(i).map_err(data_err)?.caption(), model.vocab.decode(&outputs[i])))).collect::<Result<_>>()?;
    let report = CaptionReport {
        adapter: device.adapter_name(),
        shape: model.shape,
        steps: fit.steps,
        train_scenes: (fit.steps as usize) * cfg.batch_size,
        test_scenes: test.len,
        bleu4,
        exact_match,
        examples,
        parameters: vs.num_values(),
        seconds: started.elapsed().as_secs_f64(),
        ms_per_step: 1000.0 * fit.step_seconds / fit.steps.max(1) as f64,
    };
    Ok((model, report))
}

/// PNGs of the first `count` scenes of `set` with their generated captions: `caption-{i}.png` shows the scene
/// (8x), then one panel per written word (and `<eos>`) where the grid cells it attended to keep their
/// brightness and the rest fade. Returns a line per picture: its path and the words of its panels.
pub fn caption_pictures(model: &Captioner, set: &Scenes, count: usize, dir: &std::path::Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| KilnError::Io { path: dir.display().to_string(), message: e.to_string() })?;
    let mut lines = Vec::new();
    for i in 0..count.min(set.len) {
        let image = images_of(set, i..i + 1)?;
        let words = model.greedy(&image, 24)?.remove(0);
        let weights = model.attention_weights(&image, &words)?;
        let scene = set.scene(i).map_err(data_err)?;
        let path = dir.join(format!("caption-{i}.png"));
        let mut panels = vec![None];
        panels.extend(weights.chunks(GRID * GRID).map(Some));
        crate::plot::attention_strip_png(&path, &scene.image, SCENE_SIZE, GRID, &panels, 8).map_err(|e| KilnError::Io { path: path.display().to_string(), message: e.to_string() })?;
        let mut names = model.vocab.decode(&words);
        names.push_str(" <eos>");
        lines.push(format!("{}: scene, then {}", path.display(), names));
    }
    Ok(lines)
}

/// Sizes of a [`Vqa`] model.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct VqaShape {
    pub dim: usize,
    pub hidden: usize,
    pub fused: usize,
}

/// The VQA model (names `encoder`, `places` (the cells' embeddings, [16, 64]), `words`, `question` (LSTM),
/// `attn1`, `attn2`, `hop1`, `hop2`, `image_proj`, `question_proj`, `hidden`, `out`).
pub struct Vqa {
    pub vocab: SceneVocab,
    pub shape: VqaShape,
    pub encoder: SceneEncoder,
    pub places: Param,
    pub words: Embedding,
    pub question: Rnn,
    pub attn: [MultiplicativeAttention; 2],
    pub hops: [Linear; 2],
    pub image_proj: Linear,
    pub question_proj: Linear,
    pub hidden: Linear,
    pub out: Linear,
}

impl Vqa {
    pub fn new(vs: &mut VarStore, shape: VqaShape) -> Result<Vqa> {
        let vocab = SceneVocab::default();
        let flat = GRID_CHANNELS * GRID * GRID;
        let h = shape.hidden;
        let attn = |vs: &mut VarStore, i: usize| MultiplicativeAttention::general(vs, &format!("attn{i}"), h, GRID_CHANNELS);
        let hop = |vs: &mut VarStore, i: usize| Linear::new(vs, &format!("hop{i}"), h + GRID_CHANNELS, h, Init::XavierUniform);
        Ok(Vqa {
            encoder: SceneEncoder::new(vs, "encoder")?,
            places: vs.param("places", &[GRID * GRID, GRID_CHANNELS], Init::Normal { std: 0.1 }, false)?,
            words: Embedding::new(vs, "words", words_of(&vocab), shape.dim, Some(SCENE_PAD as usize))?,
            question: Rnn::new(vs, "question", CellKind::Lstm, shape.dim, h, RnnConfig { batch_first: true, ..Default::default() })?,
            attn: [attn(vs, 1)?, attn(vs, 2)?],
            hops: [hop(vs, 1)?, hop(vs, 2)?],
            image_proj: Linear::new(vs, "image_proj", flat, shape.fused, Init::HeUniform)?,
            question_proj: Linear::new(vs, "question_proj", h, shape.fused, Init::HeUniform)?,
            hidden: Linear::new(vs, "hidden", h + shape.fused, shape.fused, Init::HeUniform)?,
            out: Linear::new(vs, "out", shape.fused, vocab.answers.len(), Init::XavierUniform)?,
            vocab,
            shape,
        })
    }

    /// images [n, 3, 32, 32], questions [n, Q] of `lengths` -> answer logits [n, answers].
    pub fn forward(&self, images: &Tensor, questions: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (n, h) = (images.shape()[0], self.shape.hidden);
        let (cells, flat) = grid_views(&self.encoder.forward(images)?)?;
        let cells = cells.broadcast_add(self.places.tensor()?)?;
        let (_, state) = self.question.forward_lengths(&self.words.forward_ids(questions)?, Some(lengths), None)?;
        let q = state.h.reshape(&[n, h])?;
        let mut u = q.clone();
        for (attn, hop) in self.attn.iter().zip(&self.hops) {
            let context = attn.context(&u.reshape(&[n, 1, h])?, &attn.project_keys(&cells)?, &cells, None)?.reshape(&[n, GRID_CHANNELS])?;
            u = hop.forward(&Tensor::concat(&[&u, &context], 1)?)?.tanh()?;
        }
        let fused = self.image_proj.forward(&flat)?.relu()?.mul(&self.question_proj.forward(&q)?.relu()?)?;
        self.out.forward(&self.hidden.forward(&Tensor::concat(&[&u, &fused], 1)?)?.relu()?)
    }

    /// (logits, answers) of a collated batch.
    fn batch_logits(&self, batch: &HostBatch) -> Result<(Tensor, Tensor)> {
        let t = batch.upload()?;
        let lengths = u32s(batch, "question_lengths")?.into_iter().map(|l| l as usize).collect::<Vec<_>>();
        Ok((self.forward(&t[0], &t[1], &lengths)?, t[3].clone()))
    }
}

impl Module for Vqa {
    fn describe(&self) -> String {
        format!("Vqa(dim={}, hidden={}, fused={})", self.shape.dim, self.shape.hidden, self.shape.fused)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.places]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("encoder".into(), &self.encoder),
            ("words".into(), &self.words),
            ("question".into(), &self.question),
            ("attn1".into(), &self.attn[0]),
            ("attn2".into(), &self.attn[1]),
            ("hop1".into(), &self.hops[0]),
            ("hop2".into(), &self.hops[1]),
            ("image_proj".into(), &self.image_proj),
            ("question_proj".into(), &self.question_proj),
            ("hidden".into(), &self.hidden),
            ("out".into(), &self.out),
        ]
    }
}

fn u32s(batch: &HostBatch, name: &str) -> Result<Vec<u32>> {
    match batch.arrays.iter().find(|a| a.name == name).map(|a| &a.data) {
        Some(HostData::U32(v)) => Ok(v.clone()),
        _ => Err(KilnError::Data(format!("a scene batch without {name}"))),
    }
}

/// What a VQA run measured.
#[derive(Clone, Debug, Serialize)]
pub struct VqaReport {
    pub adapter: String,
    pub shape: VqaShape,
    pub steps: u64,
    pub train_scenes: usize,
    pub test_scenes: usize,
    pub accuracy: f64,
    /// For each of kiln_data::QUESTION_KINDS.
    pub per_kind: KindAccuracy,
    /// (question, true answer, given answer) for the first ten test scenes.
    pub examples: Vec<(String, String, String)>,
    pub parameters: usize,
    pub seconds: f64,
    pub ms_per_step: f64,
}

/// (kind, questions, accuracy) for each question kind.
pub type KindAccuracy = Vec<(String, usize, f64)>;

/// Accuracy of `model` on `set` overall and per question kind, and its answers (ids).
pub fn evaluate_vqa(model: &Vqa, set: &SceneQuestions) -> Result<(f64, KindAccuracy, Vec<u32>)> {
    use kiln_data::Dataset;
    let mut given = Vec::with_capacity(set.len());
    let (mut kinds, mut truth) = (Vec::new(), Vec::new());
    for start in (0..set.len()).step_by(250) {
        let samples = (start..(start + 250).min(set.len())).map(|i| set.get(i)).collect::<kiln_data::Result<Vec<_>>>().map_err(data_err)?;
        let batch = HostBatch { indices: (start..start + samples.len()).collect(), arrays: kiln_data::Collate::collate(&CollateQuestions, samples).map_err(data_err)? };
        kinds.extend(u32s(&batch, "kinds")?);
        truth.extend(u32s(&batch, "answers")?);
        let logits = no_grad(|| model.batch_logits(&batch))?.0;
        given.extend(kiln_nn::metrics::argmax_rows(&logits.to_vec()?, model.vocab.answers.len()));
    }
    let per_kind = QUESTION_KINDS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let idx: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i] == k as u32).collect();
            let right = idx.iter().filter(|&&i| given[i] == truth[i]).count();
            (name.to_string(), idx.len(), right as f64 / idx.len().max(1) as f64)
        })
        .collect();
    Ok((kiln_nn::metrics::accuracy(&given, &truth), per_kind, given))
}

/// Trains the VQA model on fresh scenes, one question each, and scores it on held-out ones.
pub fn train_vqa(cfg: &SceneConfig, progress: impl FnMut(&Progress)) -> Result<(Vqa, VqaReport)> {
    let started = Instant::now();
    let device = Device::current()?;
    let (train, test) = scene_sets(cfg);
    let mut vs = VarStore::new(cfg.seed);
    let model = Vqa::new(&mut vs, VqaShape { dim: cfg.dim, hidden: cfg.hidden, fused: 2 * cfg.hidden })?;
    vs.finish()?;
    let mut opt = optimizer(&vs, cfg)?;
    let options = LoaderOptions { batch_size: cfg.batch_size, shuffle: Some(cfg.seed), drop_last: true, ..Default::default() };
    let loader = DataLoader::new(SceneQuestions(train), CollateQuestions, options).map_err(data_err)?;
    let fit = crate::trainer::fit_steps(&loader, cfg.steps, cfg.lr, started, progress, &mut opt, &vs, |b| {
        let (logits, answers) = model.batch_logits(b)?;
        loss::cross_entropy(&logits, &answers)
    })?;
    let test = SceneQuestions(test);
    let (accuracy, per_kind, given) = evaluate_vqa(&model, &test)?;
    let examples = (0..10.min(test.0.len))
        .map(|i| {
            let (_, q) = test.0.scene_question(i).map_err(data_err)?;
            Ok((q.text, q.answer, model.vocab.answers[given[i] as usize].clone()))
        })
        .collect::<Result<_>>()?;
    let report = VqaReport {
        adapter: device.adapter_name(),
        shape: model.shape,
        steps: fit.steps,
        train_scenes: (fit.steps as usize) * cfg.batch_size,
        test_scenes: test.0.len,
        accuracy,
        per_kind,
        examples,
        parameters: vs.num_values(),
        seconds: started.elapsed().as_secs_f64(),
        ms_per_step: 1000.0 * fit.step_seconds / fit.steps.max(1) as f64,
    };
    Ok((model, report))
}
