//! Synthetic scenes for captioning and visual question answering, generated from a seed: 2-4 coloured shapes
//! on a 32 x 32 canvas, each in its own quarter (column) of the canvas so "left of" is never in doubt, no two
//! of one colour and shape. A scene's caption names its shapes from left to right ("a red circle left of a
//! blue square"); its questions are of five kinds (what colour, what shape, how many, is there, is ... left of)
//! with one-word answers. Scene `i` of a [`Scenes`] set depends only on the set's seed and `i`, so sets of any
//! size need no storage and train and test sets with different seeds never share a generator stream.

use kiln_graph::Rng;

use crate::error::{DataError, Result};
use crate::loader::{Collate, Dataset, HostArray};

/// The canvas side in pixels.
pub const SCENE_SIZE: usize = 32;
/// Columns of the canvas: a shape sits in one, at most one shape per column.
pub const SCENE_COLUMNS: usize = 4;
pub const COLOURS: [&str; 5] = ["red", "green", "blue", "yellow", "white"];
const COLOUR_RGB: [[f32; 3]; 5] = [[0.9, 0.15, 0.15], [0.15, 0.75, 0.2], [0.2, 0.3, 0.95], [0.95, 0.9, 0.15], [0.95, 0.95, 0.95]];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COUNTS: [&str; 3] = ["two", "three", "four"];

/// One shape of a scene: indices into [`SHAPES`] and [`COLOURS`], its centre and half-size in pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneObject {
    pub shape: usize,
    pub colour: usize,
    pub column: usize,
    pub cx: f32,
    pub cy: f32,
    pub half: f32,
}

impl SceneObject {
    pub fn name(&self) -> String {
        format!("{} {}", COLOURS[self.colour], SHAPES[self.shape])
    }
    /// Whether the pixel centre (x, y) is inside the shape.
    fn covers(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        match self.shape {
            0 => dx * dx + dy * dy <= self.half * self.half,
            // Of about the circle's area.
            1 => dx.abs() <= 0.88 * self.half && dy.abs() <= 0.88 * self.half,
            // Apex up, base at the bottom: the width grows from 0 to 2 half.
            _ => dy.abs() <= self.half && dx.abs() <= 0.5 * (dy + self.half),
        }
    }
}

/// The kinds of question, for accuracy per kind.
pub const QUESTION_KINDS: [&str; 5] = ["colour", "shape", "count", "exists", "left-of"];

/// A question about a scene and its one-word answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// Index into [`QUESTION_KINDS`].
    pub kind: usize,
    pub text: String,
    pub answer: String,
}

/// A scene: its shapes from left to right and its picture, [3, 32, 32] RGB in [0, 1], row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub objects: Vec<SceneObject>,
    pub image: Vec<f32>,
}

impl Scene {
    /// A scene drawn from `rng`: 2-4 shapes in distinct columns, distinct (colour, shape) pairs, sizes and
    /// places jittered, colours jittered by up to 0.05, background noise of up to 0.04.
    pub fn generate(rng: &mut Rng) -> Scene {
        let count = 2 + rng.below(3);
        let mut columns: Vec<usize> = (0..SCENE_COLUMNS).collect();
        rng.shuffle(&mut columns);
        let mut columns = columns[..count].to_vec();
        columns.sort();
        let mut kinds: Vec<(usize, usize)> = (0..SHAPES.len()).flat_map(|s| (0..COLOURS.len()).map(move |c| (s, c))).collect();
        rng.shuffle(&mut kinds);
        let width = (SCENE_SIZE / SCENE_COLUMNS) as f32;
        let objects: Vec<SceneObject> = columns
            .iter()
            .zip(&kinds)
            .map(|(&column, &(shape, colour))| {
                let half = rng.range(2.8, 3.6) as f32;
                let cx = (column as f32 + 0.5) * width + rng.range(-0.4, 0.4) as f32;
                let cy = rng.range(half as f64 + 1.0, SCENE_SIZE as f64 - half as f64 - 1.0) as f32;
                SceneObject { shape, colour, column, cx, cy, half }
            })
            .collect();
        let n = SCENE_SIZE * SCENE_SIZE;
        let mut image = vec![0f32; 3 * n];
        let background = 0.12 + rng.range(-0.04, 0.04) as f32;
        for v in image.iter_mut() {
            *v = background + rng.range(-0.04, 0.04) as f32;
        }
        for o in &objects {
            let rgb: Vec<f32> = COLOUR_RGB[o.colour].iter().map(|&c| (c + rng.range(-0.05, 0.05) as f32).clamp(0.0, 1.0)).collect();
            for y in 0..SCENE_SIZE {
                for x in 0..SCENE_SIZE {
                    if o.covers(x as f32 + 0.5, y as f32 + 0.5) {
                        for (ch, &c) in rgb.iter().enumerate() {
                            image[ch * n + y * SCENE_SIZE + x] = c;
                        }
                    }
                }
            }
        }
        Scene { objects, image }
    }

    /// The caption: the shapes from left to right, "a red circle left of a blue square left of ...".
    pub fn caption(&self) -> String {
        self.objects.iter().map(|o| format!("a {}", o.name())).collect::<Vec<_>>().join(" left of ")
    }

    fn unique_by<F: Fn(&SceneObject) -> usize>(&self, key: F) -> Vec<&SceneObject> {
        self.objects.iter().filter(|o| self.objects.iter().filter(|p| key(p) == key(o)).count() == 1).collect()
    }

    /// A question of `kind` drawn from `rng`, or None where the scene has no such question (no shape or colour
    /// that only one object has).
    pub fn question(&self, kind: usize, rng: &mut Rng) -> Option<Question> {
        let pick = |v: &[&SceneObject], rng: &mut Rng| -> Option<SceneObject> { (!v.is_empty()).then(|| v[rng.below(v.len())].clone()) };
        let (text, answer) = match kind {
            0 => {
                let o = pick(&self.unique_by(|o| o.shape), rng)?;
                (format!("what colour is the {} ?", SHAPES[o.shape]), COLOURS[o.colour].to_string())
            }
            1 => {
                let o = pick(&self.unique_by(|o| o.colour), rng)?;
                (format!("what shape is the {} object ?", COLOURS[o.colour]), SHAPES[o.shape].to_string())
            }
            2 => ("how many shapes are there ?".to_string(), COUNTS[self.objects.len() - 2].to_string()),
            3 => {
                // Half of them about a shape that is there; the others about one that is not.
                let present = rng.uniform() < 0.5;
                let (s, c) = if present {
                    let o = &self.objects[rng.below(self.objects.len())];
                    (o.shape, o.colour)
                } else {
                    let absent: Vec<(usize, usize)> =
                        (0..SHAPES.len()).flat_map(|s| (0..COLOURS.len()).map(move |c| (s, c))).filter(|&(s, c)| !self.objects.iter().any(|o| o.shape == s && o.colour == c)).collect();
                    absent[rng.below(absent.len())]
                };
                (format!("is there a {} {} ?", COLOURS[c], SHAPES[s]), if present { "yes" } else { "no" }.to_string())
            }
            4 => {
                let i = rng.below(self.objects.len());
                let mut j = rng.below(self.objects.len() - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (&self.objects[i], &self.objects[j]);
                (format!("is the {} left of the {} ?", a.name(), b.name()), if i < j { "yes" } else { "no" }.to_string())
            }
            _ => return None,
        };
        Some(Question { kind, text, answer })
    }
}

/// The words of captions and questions, and the answers, as ids. Words: 0 `<pad>`, 1 `<sos>`, 2 `<eos>`,
/// 3 `<unk>`, then every word the generator writes, sorted; answers: colours, shapes, counts, yes, no.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneVocab {
    pub words: Vec<String>,
    pub answers: Vec<String>,
}

pub const SCENE_PAD: u32 = 0;
pub const SCENE_SOS: u32 = 1;
pub const SCENE_EOS: u32 = 2;
pub const SCENE_UNK: u32 = 3;

impl Default for SceneVocab {
    fn default() -> Self {
        let templates = "a left of what colour is the shape object how many shapes are there ?";
        let mut words: Vec<String> = templates.split(' ').chain(COLOURS).chain(SHAPES).map(String::from).collect();
        words.sort();
        words.dedup();
        let specials = ["<pad>", "<sos>", "<eos>", "<unk>"].map(String::from);
        let answers = COLOURS.iter().chain(&SHAPES).chain(&COUNTS).chain(&["yes", "no"]).map(|s| s.to_string()).collect();
        SceneVocab { words: specials.into_iter().chain(words).collect(), answers }
    }
}

impl SceneVocab {
    /// Word ids of `text` (split at spaces), `<unk>` for a word the vocabulary lacks.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.split_whitespace().map(|w| self.words.iter().position(|v| v == w).map(|i| i as u32).unwrap_or(SCENE_UNK)).collect()
    }
    /// The words of `ids`, specials left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().filter(|&&i| i > SCENE_UNK).filter_map(|&i| self.words.get(i as usize).map(String::as_str)).collect::<Vec<_>>().join(" ")
    }
    pub fn answer_id(&self, answer: &str) -> Option<u32> {
        self.answers.iter().position(|a| a == answer).map(|i| i as u32)
    }
}

/// `len` scenes from `seed`; scene i is drawn from its own stream (seed, i).
#[derive(Clone, Debug)]
pub struct Scenes {
    pub seed: u64,
    pub len: usize,
}

impl Scenes {
    pub fn new(seed: u64, len: usize) -> Scenes {
        Scenes { seed, len }
    }
    fn rng(&self, index: usize) -> Rng {
        // SplitMix-style mixing, so neighbouring (seed, i) give unrelated streams.
        let mut z = self.seed ^ (index as u64).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng::new(z ^ (z >> 31))
    }
    pub fn scene(&self, index: usize) -> Result<Scene> {
        if index >= self.len {
            return Err(DataError::Invalid(format!("scene {index} of a set of {}", self.len)));
        }
        Ok(Scene::generate(&mut self.rng(index)))
    }
    /// Scene `index` and a question about it: kinds in turn (index mod 5), the next kind where a scene has none
    /// of its own.
    pub fn scene_question(&self, index: usize) -> Result<(Scene, Question)> {
        let mut rng = self.rng(index);
        let scene = Scene::generate(&mut rng);
        let q = (0..QUESTION_KINDS.len()).find_map(|k| scene.question((index + k) % QUESTION_KINDS.len(), &mut rng));
        let q = q.ok_or_else(|| DataError::Invalid(format!("scene {index} has no question")))?;
        Ok((scene, q))
    }
}

/// A captioning sample: the picture and the caption's word ids.
impl Dataset for Scenes {
    type Sample = (Vec<f32>, Vec<u32>);
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<(Vec<f32>, Vec<u32>)> {
        let s = self.scene(index)?;
        let caption = SceneVocab::default().encode(&s.caption());
        Ok((s.image, caption))
    }
}

/// Scenes with a question each, for VQA: samples (picture, question ids, answer id, kind).
#[derive(Clone, Debug)]
pub struct SceneQuestions(pub Scenes);

impl Dataset for SceneQuestions {
    type Sample = (Vec<f32>, Vec<u32>, u32, u32);
    fn len(&self) -> usize {
        self.0.len
    }
    fn get(&self, index: usize) -> Result<Self::Sample> {
        let (s, q) = self.0.scene_question(index)?;
        let vocab = SceneVocab::default();
        let answer = vocab.answer_id(&q.answer).ok_or_else(|| DataError::Invalid(format!("answer {:?} of scene {index} is not in the answer list", q.answer)))?;
        Ok((s.image, vocab.encode(&q.text), answer, q.kind as u32))
    }
}

fn padded(v: impl IntoIterator<Item = u32>, len: usize) -> impl Iterator<Item = u32> {
    v.into_iter().chain(std::iter::repeat(SCENE_PAD)).take(len)
}

/// Captioning batches: "images" [n, 3, 32, 32], "decoder_input" [n, T] (`<sos>` then the words) and
/// "targets" [n, T] (the words then `<eos>`), padded with `<pad>`.
pub struct CollateCaptions;

impl Collate<(Vec<f32>, Vec<u32>)> for CollateCaptions {
    fn collate(&self, samples: Vec<(Vec<f32>, Vec<u32>)>) -> Result<Vec<HostArray>> {
        let n = samples.len();
        let t = samples.iter().map(|s| s.1.len() + 1).max().unwrap_or(1);
        let (mut images, mut input, mut targets) = (Vec::with_capacity(n * 3 * SCENE_SIZE * SCENE_SIZE), Vec::new(), Vec::new());
        for (image, words) in samples {
            images.extend(image);
            input.extend(padded(std::iter::once(SCENE_SOS).chain(words.iter().copied()), t));
            targets.extend(padded(words.into_iter().chain(std::iter::once(SCENE_EOS)), t));
        }
        Ok(vec![HostArray::f32("images", vec![n, 3, SCENE_SIZE, SCENE_SIZE], images), HostArray::u32("decoder_input", vec![n, t], input), HostArray::u32("targets", vec![n, t], targets)])
    }
}

/// VQA batches: "images" [n, 3, 32, 32], "questions" [n, Q] (padded), "question_lengths" [n], "answers" [n],
/// "kinds" [n].
pub struct CollateQuestions;

impl Collate<(Vec<f32>, Vec<u32>, u32, u32)> for CollateQuestions {
    fn collate(&self, samples: Vec<(Vec<f32>, Vec<u32>, u32, u32)>) -> Result<Vec<HostArray>> {
        let n = samples.len();
        let q = samples.iter().map(|s| s.1.len()).max().unwrap_or(1).max(1);
        let (mut images, mut questions, mut lengths, mut answers, mut kinds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (image, words, answer, kind) in samples {
            images.extend(image);
            lengths.push(words.len() as u32);
            questions.extend(padded(words, q));
            answers.push(answer);
            kinds.push(kind);
        }
        Ok(vec![
            HostArray::f32("images", vec![n, 3, SCENE_SIZE, SCENE_SIZE], images),
            HostArray::u32("questions", vec![n, q], questions),
            HostArray::u32("question_lengths", vec![n], lengths),
            HostArray::u32("answers", vec![n], answers),
            HostArray::u32("kinds", vec![n], kinds),
        ])
    }
}
