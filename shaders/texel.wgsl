// Reading a texture copy of a buffer (kiln-wgpu's TexView): float i lies in texel (i/4 % 1024, i/4 / 1024),
// component i % 4. Lavapipe fetches a texel for 8 lanes with one vector gather but reads storage buffers one
// lane at a time in a branchy loop (8x slower per float, measured: README "How it runs"), so on CPU adapters
// the kernels that matter read their inputs from these. Compiled in front of the shaders that use it.

// Texel v: floats 4v .. 4v + 4.
fn texel(t: texture_2d<f32>, v: u32) -> vec4<f32> {
    return textureLoad(t, vec2<u32>(v % 1024u, v / 1024u), 0);
}

// Float i.
fn texel_elem(t: texture_2d<f32>, i: u32) -> f32 {
    return texel(t, i / 4u)[i % 4u];
}
