//! Seeded data augmentation on the GPU (shaders/augment.wgsl): one dispatch per batch, no gradient.

use kiln_wgpu::grid_1d;

use crate::error::{invalid, Result};
use crate::kernels::{launch, out_buffer, Params, AUGMENT};
use crate::tensor::{DType, Tensor};

/// Which augmentations to apply and how strongly. Each sample draws its own random amounts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Augment {
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
    /// Shift by up to this many pixels in x and y (zero fill): random crop with padding.
    pub shift: u32,
    /// Rotate by up to this many radians either way (bilinear).
    pub rotation: f32,
    /// Scale by up to this fraction either way.
    pub scale: f32,
    /// Add up to this much brightness either way.
    pub brightness: f32,
    /// Multiply contrast by up to 1 ± this.
    pub contrast: f32,
    /// Gaussian noise of this standard deviation.
    pub noise: f32,
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        *self == Augment::default()
    }
}

impl std::str::FromStr for Augment {
    type Err = String;
    /// Comma-separated: flip, shift[:PIXELS], rotate[:DEGREES], scale[:FRACTION], jitter[:AMOUNT], noise[:STD];
    /// "none" alone is no augmentation.
    fn from_str(s: &str) -> std::result::Result<Augment, String> {
        let mut a = Augment::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = item.split_once(':').map(|(n, v)| (n, Some(v))).unwrap_or((item, None));
            let num = |default: f32| -> std::result::Result<f32, String> {
                match value {
                    None => Ok(default),
                    Some(v) => v.parse::<f32>().ok().filter(|x| x.is_finite() && *x >= 0.0).ok_or(format!("augment {item:?}: {v:?} is not a non-negative number")),
                }
            };
            match name {
                "none" => {}
                "flip" => a.flip = true,
                "shift" | "crop" => a.shift = num(2.0)? as u32,
                "rotate" | "affine" => a.rotation = num(10.0)?.to_radians(),
                "scale" => a.scale = num(0.1)?,
                "jitter" => {
                    let v = num(0.2)?;
                    (a.brightness, a.contrast) = (v, v);
                }
                "noise" => a.noise = num(0.1)?,
                _ => return Err(format!("unknown augmentation {name:?} (flip, shift[:PX], rotate[:DEG], scale[:FRAC], jitter[:AMOUNT], noise[:STD])")),
            }
        }
        Ok(a)
    }
}

impl Tensor {
    /// Augments a batch of images [n, c, h, w] with `seed` (no gradient: this is data).
    pub fn augment(&self, a: &Augment, seed: u64) -> Result<Tensor> {
        self.expect_dtype("augment", DType::F32)?;
        let s = self.shape();
        if s.len() != 4 {
            return invalid("augment", s, "expects images [n, c, h, w]");
        }
        if a.is_identity() {
            return Ok(self.detach());
        }
        let flags = a.flip as usize
            | ((a.shift > 0) as usize) << 1
            | ((a.rotation > 0.0 || a.scale > 0.0) as usize) << 2
            | ((a.brightness > 0.0 || a.contrast > 0.0) as usize) << 3
            | ((a.noise > 0.0) as usize) << 4;
        let p = Params::new()
            .u32(s[0])
            .u32(s[1])
            .u32(s[2])
            .u32(s[3])
            .u32((seed & 0xffff_ffff) as usize)
            .u32((seed >> 32) as usize)
            .u32(flags)
            .u32(a.shift as usize)
            .f32(a.rotation)
            .f32(a.scale)
            .f32(a.brightness)
            .f32(a.contrast)
            .f32(a.noise)
            .u32(0)
            .u32(0)
            .u32(0);
        let n = self.numel();
        let y = out_buffer(&self.view(), n, "augmented images")?;
        launch(&AUGMENT, "augment", &[], p, &[&self.view()], &[&y], grid_1d(n as u64, 256))?;
        Ok(Tensor::make(y, s.to_vec(), DType::F32, None))
    }
}
