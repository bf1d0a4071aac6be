//! loss.png: train and dev loss per epoch, drawn into an RGB buffer and written with the png crate. A tiny
//! built-in bitmap font labels the axes, so the picture needs no font files.

use std::path::Path;

const W: usize = 640;
const H: usize = 400;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 40;

/// 3x5 glyphs for the characters the labels use.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        'a' => [0, 7, 1, 7, 7],
        'i' => [2, 0, 2, 2, 2],
        'n' => [0, 6, 5, 5, 5],
        't' => [2, 7, 2, 2, 3],
        'r' => [0, 7, 4, 4, 4],
        'd' => [1, 7, 5, 5, 7],
        'v' => [0, 5, 5, 5, 2],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'c' => [0, 7, 4, 4, 7],
        'h' => [4, 7, 5, 5, 5],
        'l' => [2, 2, 2, 2, 2],
        's' => [0, 7, 6, 1, 7],
        _ => [0; 5],
    }
}

struct Canvas(Vec<u8>);

impl Canvas {
    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < W && y < H {
            self.0[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&rgb);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for d in [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0)] {
                self.set((x + d.0) as usize, (y + d.1) as usize, rgb);
            }
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str, rgb: [u8; 3]) {
        for (i, c) in s.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + i * 8 + col * 2 + dx, y + row * 2 + dy, rgb);
                        }
                    }
                }
            }
        }
    }
}

const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
const GREY: [u8; 3] = [90, 90, 90];

/// Plots train (blue) and dev (orange) loss against epochs 1..=n.
pub fn loss_png(path: &Path, train: &[f64], dev: &[f64]) -> std::io::Result<()> {
    let mut c = Canvas(vec![255; W * H * 3]);
    let all: Vec<f64> = train.iter().chain(dev).copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = (all.iter().copied().fold(f64::INFINITY, f64::min), all.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let n = train.len().max(dev.len()).max(2);
    let px = |i: usize| LEFT as f64 + (W - LEFT - RIGHT) as f64 * i as f64 / (n - 1) as f64;
    let py = |v: f64| TOP as f64 + (H - TOP - BOTTOM) as f64 * (1.0 - (v - lo) / (hi - lo));
    c.line((LEFT as f64, TOP as f64), (LEFT as f64, (H - BOTTOM) as f64), GREY);
    c.line((LEFT as f64, (H - BOTTOM) as f64), ((W - RIGHT) as f64, (H - BOTTOM) as f64), GREY);
    for (series, rgb) in [(train, BLUE), (dev, ORANGE)] {
        for i in 1..series.len() {
            if series[i - 1].is_finite() && series[i].is_finite() {
                c.line((px(i - 1), py(series[i - 1])), (px(i), py(series[i])), rgb);
            }
        }
    }
    c.text(4, TOP, &format!("{hi:.3}"), GREY);
    c.text(4, H - BOTTOM - 10, &format!("{lo:.3}"), GREY);
    c.text(LEFT, H - BOTTOM + 8, "1", GREY);
    c.text(W - RIGHT - 8 * format!("{n}").len(), H - BOTTOM + 8, &format!("{n}"), GREY);
    c.text(W / 2 - 30, H - 16, "epoch", GREY);
    c.text(W - 200, 8, "train", BLUE);
    c.text(W - 120, 8, "dev", ORANGE);
    c.text(LEFT + 10, 8, "loss", GREY);
    write_png(path, W as u32, H as u32, png::ColorType::Rgb, &c.0)
}

/// A grey-scale heat map of `values` [rows, cols] in [0, 1] (white 0, black 1), `cell` pixels a value, with a
/// one-pixel grey grid: attention maps (rows the outputs, columns the inputs).
pub fn heatmap_png(path: &Path, rows: usize, cols: usize, values: &[f32], cell: usize) -> std::io::Result<()> {
    let (w, h) = (cols * cell + 1, rows * cell + 1);
    let mut px = vec![200u8; w * h];
    for r in 0..rows {
        for c in 0..cols {
            let v = values.get(r * cols + c).copied().unwrap_or(0.0).clamp(0.0, 1.0);
            let shade = (255.0 * (1.0 - v)).round() as u8;
            for y in r * cell + 1..(r + 1) * cell {
                px[y * w + c * cell + 1..y * w + (c + 1) * cell].fill(shade);
            }
        }
    }
    write_png(path, w as u32, h as u32, png::ColorType::Grayscale, &px)
}

/// A row of panels, each the RGB picture `image` [3, side, side] (values in [0, 1]) scaled `scale` times:
/// `None` draws it as it is; `Some(weights)` ([grid, grid], row-major, summing to 1) keeps the brightness
/// of the cells with the most weight and fades the rest toward black, so a panel shows where a model looked.
pub fn attention_strip_png(path: &Path, image: &[f32], side: usize, grid: usize, panels: &[Option<&[f32]>], scale: usize) -> std::io::Result<()> {
    const GAP: usize = 4;
    let p = side * scale;
    let (w, h) = (panels.len() * (p + GAP) - GAP, p);
    let mut px = vec![255u8; 3 * w * h];
    let cell = side / grid.max(1);
    for (k, panel) in panels.iter().enumerate() {
        let top = panel.map(|wts| wts.iter().cloned().fold(f32::MIN, f32::max).max(1e-6));
        for y in 0..p {
            for x in 0..p {
                let (sx, sy) = (x / scale, y / scale);
                let gain = match (panel, top) {
                    (Some(wts), Some(top)) => 0.15 + 0.85 * wts.get((sy / cell) * grid + sx / cell).copied().unwrap_or(0.0) / top,
                    _ => 1.0,
                };
                for ch in 0..3 {
                    let v = image.get(ch * side * side + sy * side + sx).copied().unwrap_or(0.0) * gain;
                    px[3 * (y * w + k * (p + GAP) + x) + ch] = (255.0 * v.clamp(0.0, 1.0)).round() as u8;
                }
            }
        }
    }
    write_png(path, w as u32, h as u32, png::ColorType::Rgb, &px)
}

/// One thing drawn on a picture by [`scenes_png`]: an optional box outline labelled with the class number,
/// an optional mask tinted over the picture ([side * side], 0 or 1), in the colour of its class.
pub struct Overlay<'a> {
    pub bbox: Option<[f32; 4]>,
    pub class: u32,
    pub mask: Option<&'a [u8]>,
}

/// A distinct colour per class (a fixed palette, repeating after 20).
pub fn class_colour(class: u32) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 20] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
        [170, 255, 195],
        [128, 128, 0],
        [255, 215, 180],
        [0, 0, 128],
        [128, 128, 128],
    ];
    PALETTE[class as usize % 20]
}

/// A row of panels, each an RGB picture [3, side, side] (values in [0, 1]) scaled `scale` times with its
/// overlays: masks tinted at 45%, boxes outlined, class numbers above the boxes' corners. Detections drawn
/// next to the truth, or a predicted map next to the true one, make the picture a person checks a detector or
/// a segmenter by.
pub fn scenes_png(path: &Path, side: usize, scale: usize, panels: &[(&[f32], Vec<Overlay>)]) -> std::io::Result<()> {
    const GAP: usize = 4;
    let p = side * scale;
    let (w, h) = ((panels.len().max(1)) * (p + GAP) - GAP, p);
    let mut px = vec![255u8; 3 * w * h];
    for (k, (image, overlays)) in panels.iter().enumerate() {
        let x0 = k * (p + GAP);
        let mut put = |x: usize, y: usize, rgb: [u8; 3], alpha: f32| {
            if x < p && y < p {
                let at = 3 * (y * w + x0 + x);
                for ch in 0..3 {
                    px[at + ch] = ((1.0 - alpha) * px[at + ch] as f32 + alpha * rgb[ch] as f32).round() as u8;
                }
            }
        };
        for y in 0..p {
            for x in 0..p {
                let (sx, sy) = (x / scale, y / scale);
                let rgb = std::array::from_fn(|ch| (255.0 * image.get(ch * side * side + sy * side + sx).copied().unwrap_or(0.0).clamp(0.0, 1.0)).round() as u8);
                put(x, y, rgb, 1.0);
            }
        }
        for o in overlays {
            let colour = class_colour(o.class);
            if let Some(mask) = o.mask {
                for y in 0..p {
                    for x in 0..p {
                        if mask.get((y / scale) * side + x / scale) == Some(&1) {
                            put(x, y, colour, 0.45);
                        }
                    }
                }
            }
            let Some(bbox) = o.bbox else { continue };
            let to_px = |v: f32| ((v * scale as f32).round().max(0.0) as usize).min(p.saturating_sub(1));
            let (bx0, by0, bx1, by1) = (to_px(bbox[0]), to_px(bbox[1]), to_px(bbox[2]), to_px(bbox[3]));
            for x in bx0..=bx1 {
                put(x, by0, colour, 1.0);
                put(x, by1, colour, 1.0);
            }
            for y in by0..=by1 {
                put(bx0, y, colour, 1.0);
                put(bx1, y, colour, 1.0);
            }
            // The class number in the 3x5 font at twice its size, just inside the box's top-left corner.
            for (i, c) in o.class.to_string().chars().enumerate() {
                for (row, bits) in glyph(c).iter().enumerate() {
                    for col in 0..3 {
                        if bits & (4 >> col) != 0 {
                            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                                put(bx0 + 2 + i * 8 + col * 2 + dx, by0 + 2 + row * 2 + dy, colour, 1.0);
                            }
                        }
                    }
                }
            }
        }
    }
    write_png(path, w as u32, h as u32, png::ColorType::Rgb, &px)
}

/// A scatter plot of 2-D points (a PCA of embeddings, say), one dot per point in its class's colour
/// ([`class_colour`]), scaled to fill a 480 x 480 picture with a margin.
pub fn scatter_png(path: &Path, points: &[(f32, f32)], classes: &[u32]) -> std::io::Result<()> {
    const SIDE: usize = 480;
    const MARGIN: f32 = 16.0;
    let mut px = vec![255u8; 3 * SIDE * SIDE];
    let (mut lo, mut hi) = ((f32::MAX, f32::MAX), (f32::MIN, f32::MIN));
    for &(x, y) in points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
        lo = (lo.0.min(x), lo.1.min(y));
        hi = (hi.0.max(x), hi.1.max(y));
    }
    let span = (hi.0 - lo.0).max(hi.1 - lo.1).max(1e-9);
    let usable = SIDE as f32 - 2.0 * MARGIN;
    for (&(x, y), &c) in points.iter().zip(classes) {
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let (cx, cy) = (MARGIN + (x - lo.0) / span * usable, SIDE as f32 - MARGIN - (y - lo.1) / span * usable);
        let colour = class_colour(c);
        for dy in -1i32..=1 {
            for dx in -1i32..=1 {
                let (px_x, px_y) = (cx as i32 + dx, cy as i32 + dy);
                if (0..SIDE as i32).contains(&px_x) && (0..SIDE as i32).contains(&px_y) {
                    let at = 3 * (px_y as usize * SIDE + px_x as usize);
                    px[at..at + 3].copy_from_slice(&colour);
                }
            }
        }
    }
    write_png(path, SIDE as u32, SIDE as u32, png::ColorType::Rgb, &px)
}

/// A grid of grey images (`images`: [n, side * side] in [0, 1], row-major), `cols` to a row, each scaled
/// `scale` times with a one-pixel white gap: samples, reconstructions, interpolations.
pub fn image_grid_png(path: &Path, images: &[f32], side: usize, cols: usize, scale: usize) -> std::io::Result<()> {
    let n = images.len() / (side * side).max(1);
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let cell = side * scale + 1;
    let (w, h) = (cols * cell + 1, rows * cell + 1);
    let mut px = vec![255u8; w * h];
    for k in 0..n {
        let (x0, y0) = (1 + (k % cols) * cell, 1 + (k / cols) * cell);
        for y in 0..side * scale {
            for x in 0..side * scale {
                let v = images[k * side * side + (y / scale) * side + x / scale];
                px[(y0 + y) * w + x0 + x] = (255.0 * v.clamp(0.0, 1.0)).round() as u8;
            }
        }
    }
    write_png(path, w as u32, h as u32, png::ColorType::Grayscale, &px)
}

/// Writes 8-bit pixels (`color`'s channels, row-major) as a PNG.
fn write_png(path: &Path, w: u32, h: u32, color: png::ColorType, px: &[u8]) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(std::io::Error::other)?;
    writer.write_image_data(px).map_err(std::io::Error::other)
}
