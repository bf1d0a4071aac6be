//! Pictures from files: PNG (8-bit grey, grey + alpha, RGB, RGBA) and baseline or progressive JPEG, as RGB
//! floats in [0, 1] laid out [3, h, w]; bilinear resizing; PNG writing.

use std::path::Path;

use crate::error::{DataError, Result};

/// An RGB picture, `pixels` [3, h, w] in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Picture {
    pub pixels: Vec<f32>,
    pub h: usize,
    pub w: usize,
}

/// Decodes PNG or JPEG bytes (told apart by their signatures); `name` is the file named in errors.
pub fn decode_picture(name: &str, bytes: &[u8]) -> Result<Picture> {
    let bad = |e: String| DataError::Corrupt { file: name.into(), problem: e };
    if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().map_err(|e| bad(format!("not a readable PNG ({e})")))?;
        let mut buf = vec![0u8; reader.output_buffer_size().ok_or_else(|| bad("not a readable PNG (size unknown)".into()))?];
        let info = reader.next_frame(&mut buf).map_err(|e| bad(format!("not a readable PNG ({e})")))?;
        if info.bit_depth != png::BitDepth::Eight {
            return Err(bad(format!("a PNG of {:?} bits per channel; 8 are read", info.bit_depth)));
        }
        let channels = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => return Err(bad(format!("a PNG of colour type {other:?}, not read"))),
        };
        return Ok(from_interleaved(&buf, channels, info.height as usize, info.width as usize));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut decoder = jpeg_decoder::Decoder::new(std::io::Cursor::new(bytes));
        let buf = decoder.decode().map_err(|e| bad(format!("not a readable JPEG ({e})")))?;
        let info = decoder.info().ok_or_else(|| bad("not a readable JPEG (no header)".into()))?;
        let channels = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 => 1,
            jpeg_decoder::PixelFormat::RGB24 => 3,
            other => return Err(bad(format!("a JPEG of pixel format {other:?}, not read"))),
        };
        return Ok(from_interleaved(&buf, channels, info.height as usize, info.width as usize));
    }
    Err(bad("neither a PNG nor a JPEG (unknown signature)".into()))
}

fn from_interleaved(buf: &[u8], channels: usize, h: usize, w: usize) -> Picture {
    let mut pixels = vec![0f32; 3 * h * w];
    for i in 0..h * w {
        for c in 0..3 {
            let src = if channels < 3 { 0 } else { c };
            pixels[c * h * w + i] = buf[i * channels + src] as f32 / 255.0;
        }
    }
    Picture { pixels, h, w }
}

/// Reads a PNG or JPEG file; errors name the file.
pub fn load_picture(path: &Path) -> Result<Picture> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { file: path.display().to_string(), source })?;
    decode_picture(&path.display().to_string(), &bytes)
}

impl Picture {
    /// Bilinear resampling to h x w (pixel centres aligned, as PyTorch's `interpolate(align_corners=False)`
    /// without antialiasing).
    pub fn resized(&self, h: usize, w: usize) -> Picture {
        let mut pixels = vec![0f32; 3 * h * w];
        let src = |out: usize, inp: usize, i: usize| ((i as f32 + 0.5) * inp as f32 / out as f32 - 0.5).max(0.0);
        for y in 0..h {
            let sy = src(h, self.h, y);
            let (y0, fy) = ((sy.floor() as usize).min(self.h - 1), sy - sy.floor());
            let y1 = (y0 + 1).min(self.h - 1);
            for x in 0..w {
                let sx = src(w, self.w, x);
                let (x0, fx) = ((sx.floor() as usize).min(self.w - 1), sx - sx.floor());
                let x1 = (x0 + 1).min(self.w - 1);
                for c in 0..3 {
                    let at = |yy: usize, xx: usize| self.pixels[c * self.h * self.w + yy * self.w + xx];
                    pixels[c * h * w + y * w + x] = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1));
                }
            }
        }
        Picture { pixels, h, w }
    }

    /// Writes an 8-bit RGB PNG (values clamped to [0, 1]).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| DataError::Io { file: path.display().to_string(), source: e };
        let mut buf = vec![0u8; 3 * self.h * self.w];
        for i in 0..self.h * self.w {
            for c in 0..3 {
                buf[3 * i + c] = (255.0 * self.pixels[c * self.h * self.w + i].clamp(0.0, 1.0)).round() as u8;
            }
        }
        let file = std::fs::File::create(path).map_err(io)?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| io(std::io::Error::other(e)))?;
        writer.write_image_data(&buf).map_err(|e| io(std::io::Error::other(e)))?;
        Ok(())
    }
}

/// The pictures shipped in the repository's data/images (licences in its LICENSE.txt), by file name.
pub const BUNDLED_PICTURES: [(&str, &[u8]); 2] =
    [("astronaut.png", include_bytes!("../../../data/images/astronaut.png")), ("starry_night.jpg", include_bytes!("../../../data/images/starry_night.jpg"))];

/// Reads `path`; when there is no such file and its name is one of [`BUNDLED_PICTURES`], the shipped copy.
pub fn load_picture_or_bundled(path: &Path) -> Result<Picture> {
    if !path.exists() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some((_, bytes)) = BUNDLED_PICTURES.iter().find(|(n, _)| *n == name) {
            return decode_picture(name, bytes);
        }
    }
    load_picture(path)
}
