//! Detection and segmentation scenes built from real objects: MNIST-10k digits and Fashion-MNIST items (their
//! own pixels) pasted at random scales (0.5-2x), several per picture, some overlapping, some cut by the border,
//! onto crops of shipped photos (data/images: brick, chelsea, coffee; CC0). Each scene has exact boxes (the
//! tight box of the object's visible pixels), class labels, instance masks (the visible pixels) and a
//! per-pixel semantic map. Scene i of a set depends only on (seed, split, i); objects of the test split come
//! from the test images of their source (MNIST-10k's seeded test split, Fashion-MNIST's official test set).

use std::path::Path;
use std::sync::Arc;

use kiln_graph::Rng;

use crate::dataset::{ArrayDataset, Targets};
use crate::error::{DataError, Result};
use crate::loader::{Dataset, Detection};
use crate::picture::Picture;

const BACKGROUNDS: [(&str, &[u8]); 3] = [
    ("brick.png", include_bytes!("../../../data/images/brick.png")),
    ("chelsea.png", include_bytes!("../../../data/images/chelsea.png")),
    ("coffee.png", include_bytes!("../../../data/images/coffee.png")),
];

const FASHION: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Where the objects come from: class ids 0-9 are digits (or Fashion-MNIST's classes alone), with `Both`
/// 10-19 are Fashion-MNIST's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectSource {
    Digits,
    Fashion,
    Both,
}

impl ObjectSource {
    pub fn class_names(&self) -> Vec<String> {
        let digits = (0..10).map(|d| format!("digit {d}"));
        let fashion = FASHION.iter().map(|s| s.to_string());
        match self {
            ObjectSource::Digits => digits.collect(),
            ObjectSource::Fashion => fashion.collect(),
            ObjectSource::Both => digits.chain(fashion).collect(),
        }
    }
}

/// How scenes are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObjectSceneConfig {
    /// Canvas side in pixels.
    pub size: usize,
    /// Objects per scene, at least and at most (fewer when placements keep failing the occlusion limit).
    pub objects: (usize, usize),
    /// Object side as a multiple of the 28-pixel source: 0.5-2 by default.
    pub scale: (f32, f32),
    pub source: ObjectSource,
    /// An object stays at least this share visible (of its pixels inside the canvas) under the ones above it.
    pub min_visible: f32,
}

impl Default for ObjectSceneConfig {
    fn default() -> Self {
        ObjectSceneConfig { size: 128, objects: (2, 6), scale: (0.5, 2.0), source: ObjectSource::Both, min_visible: 0.4 }
    }
}

/// Which source images a set draws its objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectSplit {
    Train,
    Test,
}

/// One object of a scene: its class, box (x1, y1, x2, y2: the tight box of its visible pixels, pixel edges)
/// and visible mask [size, size] (0 or 1).
#[derive(Clone, Debug, PartialEq)]
pub struct PastedObject {
    pub class: u32,
    pub bbox: [f32; 4],
    pub mask: Vec<u8>,
}

/// A scene: the picture [3, size, size] (RGB in [0, 1]), its objects bottom to top, and the semantic map
/// [size, size] (0 background, class + 1 where an object is visible).
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectScene {
    pub image: Vec<f32>,
    pub size: usize,
    pub objects: Vec<PastedObject>,
    pub semantic: Vec<u32>,
}

/// 28 x 28 grey glyphs, their classes, and the glyphs of each class (a class is drawn first, then one of its
/// glyphs, so digits and Fashion-MNIST's larger sets appear equally often).
struct Glyphs {
    pixels: Vec<f32>,
    classes: Vec<u32>,
    by_class: Vec<Vec<usize>>,
}

impl Glyphs {
    fn push(&mut self, set: &ArrayDataset, offset: u32) -> Result<()> {
        if set.features != 784 {
            return Err(DataError::Invalid(format!("{}: images of {} values, expected 28 x 28", set.name, set.features)));
        }
        let Targets::Classes { labels, .. } = &set.targets else { return Err(DataError::Invalid(format!("{}: no class labels", set.name))) };
        self.pixels.extend_from_slice(&set.x);
        self.classes.extend(labels.iter().map(|&l| l + offset));
        Ok(())
    }
}

/// A set of `len` scenes.
#[derive(Clone)]
pub struct ObjectScenes {
    pub cfg: ObjectSceneConfig,
    pub split: ObjectSplit,
    pub seed: u64,
    pub len: usize,
    glyphs: Arc<Glyphs>,
    backgrounds: Arc<Vec<Picture>>,
}

impl ObjectScenes {
    /// Loads the sources (MNIST-10k shipped; Fashion-MNIST from `data_dir`, KILN_DATA or the Debian package
    /// dataset-fashion-mnist) and the backgrounds.
    pub fn new(cfg: ObjectSceneConfig, split: ObjectSplit, seed: u64, len: usize, data_dir: Option<&Path>) -> Result<ObjectScenes> {
        if cfg.size < 32 || cfg.objects.0 > cfg.objects.1 || cfg.objects.1 == 0 || !(cfg.scale.0 > 0.0 && cfg.scale.0 <= cfg.scale.1) || 28.0 * cfg.scale.1 > cfg.size as f32 {
            return Err(DataError::Invalid(format!(
                "object scenes: a canvas of at least 32 pixels, 1 or more objects and scales 0 < lo <= hi with 28 x hi pixels within the canvas are needed (got {cfg:?})"
            )));
        }
        let mut glyphs = Glyphs { pixels: Vec::new(), classes: Vec::new(), by_class: Vec::new() };
        let pick = |s: crate::prep::Split| match split {
            ObjectSplit::Train => s.train,
            ObjectSplit::Test => s.test,
        };
        if matches!(cfg.source, ObjectSource::Digits | ObjectSource::Both) {
            // The split `kiln train --dataset mnist` uses (seed 42): no test digit is ever a training digit.
            glyphs.push(&pick(crate::loaders::load_split("mnist", data_dir, 42)?), 0)?;
        }
        if matches!(cfg.source, ObjectSource::Fashion | ObjectSource::Both) {
            let (train, test) = crate::loaders::load_fashion_mnist(data_dir)?;
            let offset = if cfg.source == ObjectSource::Both { 10 } else { 0 };
            glyphs.push(if split == ObjectSplit::Train { &train } else { &test }, offset)?;
        }
        glyphs.by_class = vec![Vec::new(); cfg.source.class_names().len()];
        for (i, &c) in glyphs.classes.iter().enumerate() {
            glyphs.by_class[c as usize].push(i);
        }
        if let Some(c) = glyphs.by_class.iter().position(|v| v.is_empty()) {
            return Err(DataError::Invalid(format!("object scenes: no image of class {c} ({}) in the {split:?} split", cfg.source.class_names()[c])));
        }
        let backgrounds = BACKGROUNDS.iter().map(|(name, bytes)| crate::picture::decode_picture(name, bytes)).collect::<Result<Vec<_>>>()?;
        if backgrounds.iter().any(|b| b.h < cfg.size || b.w < cfg.size) {
            return Err(DataError::Invalid(format!("object scenes: a canvas of {} pixels is larger than a background picture (300 x 451 at least)", cfg.size)));
        }
        Ok(ObjectScenes { cfg, split, seed, len, glyphs: Arc::new(glyphs), backgrounds: Arc::new(backgrounds) })
    }

    pub fn classes(&self) -> usize {
        self.cfg.source.class_names().len()
    }

    fn rng(&self, index: usize) -> Rng {
        let salt = match self.split {
            ObjectSplit::Train => 0x5eed_0001u64,
            ObjectSplit::Test => 0x5eed_0002,
        };
        let mut z = (self.seed ^ salt.wrapping_mul(0xa076_1d64_78bd_642f)) ^ (index as u64).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng::new(z ^ (z >> 31))
    }

    /// Scenes `from..from + n` and their pictures stacked as [n, 3, size, size] values: a batch.
    pub fn batch(&self, from: usize, n: usize) -> Result<(Vec<f32>, Vec<ObjectScene>)> {
        let scenes = (from..from + n).map(|i| self.scene(i)).collect::<Result<Vec<_>>>()?;
        Ok((scenes.iter().flat_map(|sc| sc.image.iter().copied()).collect(), scenes))
    }

    /// Scene `index`.
    pub fn scene(&self, index: usize) -> Result<ObjectScene> {
        if index >= self.len {
            return Err(DataError::Invalid(format!("scene {index} of a set of {}", self.len)));
        }
        let mut rng = self.rng(index);
        let s = self.cfg.size;
        let n = s * s;
        // The background: a random crop of a random picture, maybe mirrored, dimmed so objects show.
        let bg = &self.backgrounds[rng.below(self.backgrounds.len())];
        let (top, left, flip) = (rng.below(bg.h - s + 1), rng.below(bg.w - s + 1), rng.uniform() < 0.5);
        let dim = rng.range(0.35, 0.65) as f32;
        let mut image = vec![0f32; 3 * n];
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let sx = if flip { left + s - 1 - x } else { left + x };
                    image[c * n + y * s + x] = dim * bg.pixels[c * bg.h * bg.w + (top + y) * bg.w + sx];
                }
            }
        }
        // owner[p]: the index of the top object covering pixel p.
        let mut owner: Vec<Option<usize>> = vec![None; n];
        let mut placed: Vec<(u32, usize)> = Vec::new(); // (class, pixels inside the canvas)
        let count = self.cfg.objects.0 + rng.below(self.cfg.objects.1 - self.cfg.objects.0 + 1);
        for _ in 0..count {
            for _attempt in 0..20 {
                let of_class = &self.glyphs.by_class[rng.below(self.glyphs.by_class.len())];
                let g = of_class[rng.below(of_class.len())];
                let side = ((28.0 * rng.range(self.cfg.scale.0 as f64, self.cfg.scale.1 as f64)).round() as usize).max(4);
                let alpha = resize_glyph(&self.glyphs.pixels[g * 784..(g + 1) * 784], side);
                // Up to 30% of the object may hang over each border.
                let reach = (0.3 * side as f64) as isize;
                let oy = rng.below(s + 2 * reach as usize - side + 1) as isize - reach;
                let ox = rng.below(s + 2 * reach as usize - side + 1) as isize - reach;
                let covered: Vec<(usize, f32)> = (0..side * side)
                    .filter_map(|i| {
                        let (y, x) = (oy + (i / side) as isize, ox + (i % side) as isize);
                        (alpha[i] > 0.5 && y >= 0 && x >= 0 && (y as usize) < s && (x as usize) < s).then(|| (y as usize * s + x as usize, alpha[i]))
                    })
                    .collect();
                if covered.len() < 12 {
                    continue;
                }
                // Would any object below lose too much of itself?
                let mut lost = vec![0usize; placed.len()];
                for &(p, _) in &covered {
                    if let Some(o) = owner[p] {
                        lost[o] += 1;
                    }
                }
                let visible = |o: usize| owner.iter().filter(|&&w| w == Some(o)).count();
                if (0..placed.len()).any(|o| lost[o] > 0 && ((visible(o) - lost[o]) as f32) < self.cfg.min_visible * placed[o].1 as f32) {
                    continue;
                }
                let colour: Vec<f32> = (0..3).map(|_| rng.range(0.55, 1.0) as f32).collect();
                let me = placed.len();
                for (i, &a) in alpha.iter().enumerate() {
                    let (y, x) = (oy + (i / side) as isize, ox + (i % side) as isize);
                    if y < 0 || x < 0 || y as usize >= s || x as usize >= s {
                        continue;
                    }
                    let p = y as usize * s + x as usize;
                    for (c, &tint) in colour.iter().enumerate() {
                        image[c * n + p] = image[c * n + p] * (1.0 - a) + tint * a;
                    }
                }
                for &(p, _) in &covered {
                    owner[p] = Some(me);
                }
                placed.push((self.glyphs.classes[g], covered.len()));
                break;
            }
        }
        let objects: Vec<PastedObject> = placed
            .iter()
            .enumerate()
            .filter_map(|(o, &(class, _))| {
                let mask: Vec<u8> = owner.iter().map(|&w| (w == Some(o)) as u8).collect();
                let pts: Vec<usize> = (0..n).filter(|&p| mask[p] == 1).collect();
                if pts.is_empty() {
                    return None;
                }
                let (xs, ys) = (pts.iter().map(|p| p % s), pts.iter().map(|p| p / s));
                let bbox = [xs.clone().min()? as f32, ys.clone().min()? as f32, xs.max()? as f32 + 1.0, ys.max()? as f32 + 1.0];
                Some(PastedObject { class, bbox, mask })
            })
            .collect();
        let semantic: Vec<u32> = owner.iter().map(|w| w.map(|o| placed[o].0 + 1).unwrap_or(0)).collect();
        Ok(ObjectScene { image, size: s, objects, semantic })
    }
}

/// A 28 x 28 glyph resized to side x side (bilinear, pixel centres aligned).
fn resize_glyph(src: &[f32], side: usize) -> Vec<f32> {
    let scale = 28.0 / side as f32;
    let mut out = vec![0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            let sy = ((y as f32 + 0.5) * scale - 0.5).clamp(0.0, 27.0);
            let sx = ((x as f32 + 0.5) * scale - 0.5).clamp(0.0, 27.0);
            let (y0, x0) = (sy as usize, sx as usize);
            let (y1, x1) = ((y0 + 1).min(27), (x0 + 1).min(27));
            let (fy, fx) = (sy - y0 as f32, sx - x0 as f32);
            let at = |r: usize, c: usize| src[r * 28 + c];
            out[y * side + x] = (at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx) * (1.0 - fy) + (at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx) * fy;
        }
    }
    out
}

impl Dataset for ObjectScenes {
    type Sample = Detection;
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<Detection> {
        let s = self.scene(index)?;
        Ok(Detection {
            shape: [3, s.size, s.size],
            boxes: s.objects.iter().map(|o| o.bbox).collect(),
            labels: s.objects.iter().map(|o| o.class).collect(),
            masks: Some(s.objects.into_iter().map(|o| o.mask).collect()),
            image: s.image,
        })
    }
}
