// Data augmentation of a batch of images on the GPU, seeded: every sample draws its own random flip,
// shift, rotation/scale, brightness/contrast and noise from a hash of (seed, sample), so a batch is
// augmented in one dispatch and the same seed gives the same images.
//   x: [n, c, h, w] -> y: [n, c, h, w]; pixels that come from outside the image are 0.

struct AugmentParams {
    n: u32, c: u32, h: u32, w: u32,
    seed_lo: u32, seed_hi: u32, flags: u32, max_shift: u32,
    max_rotation: f32, max_scale: f32, brightness: f32, contrast: f32,
    noise_std: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

const FLIP: u32 = 1u;
const SHIFT: u32 = 2u;
const AFFINE: u32 = 4u;
const JITTER: u32 = 8u;
const NOISE: u32 = 16u;

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> ap: AugmentParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Uniform [0, 1) number `k` of sample `s`.
fn sample_uniform(s: u32, k: u32) -> f32 {
    let h = pcg(pcg(s * 16u + k) ^ pcg(ap.seed_lo) ^ (ap.seed_hi * 0x9E3779B9u));
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

fn pixel(plane: u32, yy: i32, xx: i32) -> f32 {
    if (yy < 0 || xx < 0 || yy >= i32(ap.h) || xx >= i32(ap.w)) { return 0.0; }
    return x[plane * ap.h * ap.w + u32(yy) * ap.w + u32(xx)];
}

@compute @workgroup_size(WG)
fn augment(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= ap.n * ap.c * ap.h * ap.w) { return; }
    let ox = i % ap.w;
    let oy = (i / ap.w) % ap.h;
    let plane = i / (ap.w * ap.h);
    let s = plane / ap.c;
    // Output pixel -> source position: undo shift, then rotation/scale about the centre, then flip.
    var sx = f32(ox);
    var sy = f32(oy);
    if ((ap.flags & SHIFT) != 0u) {
        let span = f32(2u * ap.max_shift + 1u);
        sx = sx - (floor(sample_uniform(s, 1u) * span) - f32(ap.max_shift));
        sy = sy - (floor(sample_uniform(s, 2u) * span) - f32(ap.max_shift));
    }
    var value: f32;
    if ((ap.flags & AFFINE) != 0u) {
        let angle = (2.0 * sample_uniform(s, 3u) - 1.0) * ap.max_rotation;
        let scale = 1.0 + (2.0 * sample_uniform(s, 4u) - 1.0) * ap.max_scale;
        let cx = 0.5 * f32(ap.w - 1u);
        let cy = 0.5 * f32(ap.h - 1u);
        let dx = (sx - cx) / scale;
        let dy = (sy - cy) / scale;
        sx = cos(angle) * dx + sin(angle) * dy + cx;
        sy = -sin(angle) * dx + cos(angle) * dy + cy;
        if ((ap.flags & FLIP) != 0u && sample_uniform(s, 0u) < 0.5) { sx = f32(ap.w - 1u) - sx; }
        // Bilinear sampling.
        let x0 = floor(sx);
        let y0 = floor(sy);
        let fx = sx - x0;
        let fy = sy - y0;
        let xi = i32(x0);
        let yi = i32(y0);
        value = mix(mix(pixel(plane, yi, xi), pixel(plane, yi, xi + 1), fx), mix(pixel(plane, yi + 1, xi), pixel(plane, yi + 1, xi + 1), fx), fy);
    } else {
        if ((ap.flags & FLIP) != 0u && sample_uniform(s, 0u) < 0.5) { sx = f32(ap.w - 1u) - sx; }
        value = pixel(plane, i32(sy), i32(sx));
    }
    if ((ap.flags & JITTER) != 0u) {
        let contrast = 1.0 + (2.0 * sample_uniform(s, 5u) - 1.0) * ap.contrast;
        let brightness = (2.0 * sample_uniform(s, 6u) - 1.0) * ap.brightness;
        value = value * contrast + brightness;
    }
    if ((ap.flags & NOISE) != 0u) {
        // Box-Muller from two per-pixel uniforms.
        let h1 = pcg(pcg(i ^ 0x68E31DA4u) ^ pcg(ap.seed_lo + 0x1B873593u) ^ ap.seed_hi);
        let h2 = pcg(h1 ^ 0x85EBCA6Bu);
        let u1 = max(f32(h1 >> 8u) * (1.0 / 16777216.0), 1e-7);
        let u2 = f32(h2 >> 8u) * (1.0 / 16777216.0);
        value = value + ap.noise_std * sqrt(-2.0 * log(u1)) * cos(6.2831853 * u2);
    }
    y[i] = value;
}
