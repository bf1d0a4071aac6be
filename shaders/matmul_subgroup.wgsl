// matmul_subgroup: C = op(A) @ op(B) with A shared across lanes by subgroup shuffles; the variant lavapipe
// rewards. Its own file because it needs Features::SUBGROUP, which the other matmul kernels do not.
// Params and bindings: matmul_common.wgsl, compiled in front of this file. Both kernels read the operands from
// rgba32float texture copies (kiln-wgpu's TexView: float i in texel (i/4 % 1024, i/4 / 1024), bound after C):
// lavapipe reads a storage buffer one lane at a time in a branchy loop, 215 ns per vec4 load of a subgroup on
// this VM, but fetches a texel for all 8 lanes with one vector gather, 27 ns. Loads are what these kernels' speed
// is made of there; on real GPUs the copies cost a little and the tuner weighs them.

@group(0) @binding(4) var a_tex: texture_2d<f32>;
@group(0) @binding(5) var b_tex: texture_2d<f32>;

// Texel v (floats 4v .. 4v + 4) of an operand.
fn a4(v: u32) -> vec4<f32> {
    return textureLoad(a_tex, vec2<u32>(v % 1024u, v / 1024u), 0);
}

fn b4(v: u32) -> vec4<f32> {
    return textureLoad(b_tex, vec2<u32>(v % 1024u, v / 1024u), 0);
}

// A[row, kk] and B[kk, col] of the stored layouts, as a_at / b_at in matmul_common.wgsl.
fn a_tex_at(base: u32, row: u32, kk: u32) -> f32 {
    let i = select(base + row * p.k + kk, base + kk * p.m + row, TRANS_A);
    return a4(i / 4u)[i % 4u];
}

fn b_tex_at(base: u32, kk: u32, col: u32) -> f32 {
    let i = select(base + kk * p.n + col, base + col * p.k + kk, TRANS_B);
    return b4(i / 4u)[i % 4u];
}

// Groups of 8 lanes (along x) cover 32 columns; each lane owns 4 columns and RB rows. Per slice of k, each
// lane loads a 1/8 share of the A values the group needs and the others read it by shuffle, so A costs RB/8
// loads per k instead of RB. Needs subgroups of at least 8 lanes (checked by the launcher). Lanes past the
// edges compute on clamped indices and skip their stores, keeping the shuffles in uniform control flow; A
// reads as zero past k, so clamped B values there add nothing.
override RB: u32 = 16u;

// Where a lane's block lies: its first column and row, the subgroup lane of its group's lid.x == 0, the
// operands' batch offsets, and its 4 columns clamped into C.
struct LaneTile { col0: u32, row0: u32, first: u32, a_base: u32, b_base: u32, cc: vec4<u32> }

fn lane_tile(lid: vec3<u32>, wid: vec3<u32>, lane: u32) -> LaneTile {
    let col0 = (wid.x * 8u + lid.x) * 4u;
    let cc = min(vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u));
    return LaneTile(col0, wid.y * RB, lane - lid.x, wid.z * p.a_batch_stride, wid.z * p.b_batch_stride, cc);
}

// Writes this lane's RB x 4 block of C, skipping what lies past the edges.
fn store_lane_block(c_base: u32, row0: u32, col0: u32, acc: ptr<function, array<vec4<f32>, 32>>) {
    for (var i = 0u; i < RB; i = i + 1u) {
        let row = row0 + i;
        if (row >= p.m) { break; }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let at = c_base + row * p.n + col0 + j;
            if (col0 + j < p.n) { c[at] = (*acc)[i][j] + select(0.0, c[at], ACCUMULATE); }
        }
    }
}

// Scalar loads (one texel fetch each): any shape.
@compute @workgroup_size(8, 1, 1)
fn matmul_subgroup(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(subgroup_invocation_id) lane: u32) {
    let tile = lane_tile(lid, wid, lane);
    var acc: array<vec4<f32>, 32>;
    var a_own: array<f32, 32>;
    for (var i = 0u; i < RB; i = i + 1u) { acc[i] = vec4<f32>(0.0); }
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + 8u) {
        let k_own = k0 + lid.x;
        for (var i = 0u; i < RB; i = i + 1u) {
            a_own[i] = select(0.0, a_tex_at(tile.a_base, min(tile.row0 + i, p.m - 1u), min(k_own, p.k_end - 1u)), k_own < p.k_end);
        }
        for (var j = 0u; j < 8u; j = j + 1u) {
            let kk = min(k0 + j, p.k_end - 1u);
            let bv = vec4<f32>(b_tex_at(tile.b_base, kk, tile.cc.x), b_tex_at(tile.b_base, kk, tile.cc.y), b_tex_at(tile.b_base, kk, tile.cc.z), b_tex_at(tile.b_base, kk, tile.cc.w));
            for (var i = 0u; i < RB; i = i + 1u) {
                acc[i] = fma(vec4<f32>(subgroupShuffle(a_own[i], tile.first + j)), bv, acc[i]);
            }
        }
    }
    store_lane_block(wid.z * p.m * p.n, tile.row0, tile.col0, &acc);
}

// ---- matmul_subgroup_vec4: the same with 16-byte loads of both operands --------------------------------------
// For when each operand's contiguous axis and batch stride are multiples of 4. Without TRANS_A each lane loads 4
// consecutive k of every row (slices of 32 k); with TRANS_A, 4 consecutive rows at one k (slices of 8 k).
override KC: u32 = 8u; // 32 without TRANS_A, 8 with it (set by the launcher)

@compute @workgroup_size(8, 1, 1)
fn matmul_subgroup_vec4(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(subgroup_invocation_id) lane: u32) {
    let tile = lane_tile(lid, wid, lane);
    var acc: array<vec4<f32>, 32>;
    var a_own4: array<vec4<f32>, 32>;
    for (var i = 0u; i < RB; i = i + 1u) { acc[i] = vec4<f32>(0.0); }
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + KC) {
        if (!TRANS_A) {
            // a_own4[i] = A[row0 + i, k0 + 4 lid.x .. + 4]
            let k_own = k0 + 4u * lid.x;
            for (var i = 0u; i < RB; i = i + 1u) {
                let v = a4((tile.a_base + min(tile.row0 + i, p.m - 1u) * p.k + min(k_own, p.k_end - 4u)) / 4u);
                a_own4[i] = select(vec4<f32>(0.0), v, k_own < p.k_end);
            }
        } else {
            // a_own4[q] = A[row0 + 4q .. + 4, k0 + lid.x] (A stored [k, m])
            let k_own = k0 + lid.x;
            for (var q = 0u; q < RB / 4u; q = q + 1u) {
                let v = a4((tile.a_base + min(k_own, p.k_end - 1u) * p.m + min(tile.row0 + 4u * q, p.m - 4u)) / 4u);
                a_own4[q] = select(vec4<f32>(0.0), v, k_own < p.k_end);
            }
        }
        for (var j4 = 0u; j4 < KC; j4 = j4 + 4u) {
            // bq[t] = B[k0 + j4 + t, col0 .. + 4]
            var bq: array<vec4<f32>, 4>;
            if (TRANS_B) {
                let kq = min(k0 + j4, p.k_end - 4u);
                let c0 = b4((tile.b_base + tile.cc.x * p.k + kq) / 4u);
                let c1 = b4((tile.b_base + tile.cc.y * p.k + kq) / 4u);
                let c2 = b4((tile.b_base + tile.cc.z * p.k + kq) / 4u);
                let c3 = b4((tile.b_base + tile.cc.w * p.k + kq) / 4u);
                bq[0] = vec4<f32>(c0.x, c1.x, c2.x, c3.x);
                bq[1] = vec4<f32>(c0.y, c1.y, c2.y, c3.y);
                bq[2] = vec4<f32>(c0.z, c1.z, c2.z, c3.z);
                bq[3] = vec4<f32>(c0.w, c1.w, c2.w, c3.w);
            } else {
                for (var t = 0u; t < 4u; t = t + 1u) {
                    bq[t] = b4((tile.b_base + min(k0 + j4 + t, p.k_end - 1u) * p.n + min(tile.col0, p.n - 4u)) / 4u);
                }
            }
            if (!TRANS_A) {
                // Lane j4 / 4 holds k0 + j4 .. + 4 of every row.
                for (var i = 0u; i < RB; i = i + 1u) {
                    let av = subgroupShuffle(a_own4[i], tile.first + j4 / 4u);
                    acc[i] = fma(vec4<f32>(av.w), bq[3], fma(vec4<f32>(av.z), bq[2], fma(vec4<f32>(av.y), bq[1], fma(vec4<f32>(av.x), bq[0], acc[i]))));
                }
            } else {
                // Lane j4 + t holds rows row0 + 4q .. + 4 at k0 + j4 + t.
                for (var q = 0u; q < RB / 4u; q = q + 1u) {
                    let a0 = subgroupShuffle(a_own4[q], tile.first + j4);
                    let a1 = subgroupShuffle(a_own4[q], tile.first + j4 + 1u);
                    let a2 = subgroupShuffle(a_own4[q], tile.first + j4 + 2u);
                    let a3 = subgroupShuffle(a_own4[q], tile.first + j4 + 3u);
                    acc[4u * q] = fma(vec4<f32>(a3.x), bq[3], fma(vec4<f32>(a2.x), bq[2], fma(vec4<f32>(a1.x), bq[1], fma(vec4<f32>(a0.x), bq[0], acc[4u * q]))));
                    acc[4u * q + 1u] = fma(vec4<f32>(a3.y), bq[3], fma(vec4<f32>(a2.y), bq[2], fma(vec4<f32>(a1.y), bq[1], fma(vec4<f32>(a0.y), bq[0], acc[4u * q + 1u]))));
                    acc[4u * q + 2u] = fma(vec4<f32>(a3.z), bq[3], fma(vec4<f32>(a2.z), bq[2], fma(vec4<f32>(a1.z), bq[1], fma(vec4<f32>(a0.z), bq[0], acc[4u * q + 2u]))));
                    acc[4u * q + 3u] = fma(vec4<f32>(a3.w), bq[3], fma(vec4<f32>(a2.w), bq[2], fma(vec4<f32>(a1.w), bq[1], fma(vec4<f32>(a0.w), bq[0], acc[4u * q + 3u]))));
                }
            }
        }
    }
    store_lane_block(wid.z * p.m * p.n, tile.row0, tile.col0, &acc);
}

// ---- conv_gemm: a convolution as a product whose B operand is gathered from an image on the fly ---------------
// No im2col buffer is written or read back: each B element is fetched from a texture copy of the image (x, or
// the output gradient) at the position its (k, column) pair names. The k index's split into (channel, tap) is
// stepped along, never divided: lavapipe turns a vector division into one division per lane.
//   B_SOURCE 1 (forward):          B[(ci, ky, kx), (oy, ox)] = x[b, ci, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw]
//   B_SOURCE 2 (weight gradient):  B[(oy, ox), (ci, ky, kx)], the same element (B is im2col(x) transposed)
//   B_SOURCE 3 (input gradient, stride 1):  B[(co, ky, kx), (iy, ix)] = dy[b, co, iy + ph - ky*dh, ix + pw - kx*dw]
// and 0 where the position falls outside the image. A is an ordinary operand (a_tex): the weight [c_out, k],
// the output gradient [c_out, oh*ow] per sample, or the weight permuted to [c_in, c_out*kh*kw].
override B_SOURCE: u32 = 1u;

// Where k index kk sits: (channel, ky, kx) for sources 1 and 3, (oy, ox, 0) for source 2.
fn conv_k_split(kk: u32) -> vec3<u32> {
    if (B_SOURCE == 2u) { return vec3<u32>(kk / p.ow, kk % p.ow, 0u); }
    let taps = p.kh * p.kw;
    return vec3<u32>(kk / taps, (kk % taps) / p.kw, kk % p.kw);
}

// The split of the k index after s's.
fn conv_k_next(s: vec3<u32>) -> vec3<u32> {
    if (B_SOURCE == 2u) {
        let wrap = s.y + 1u == p.ow;
        return vec3<u32>(s.x + select(0u, 1u, wrap), select(s.y + 1u, 0u, wrap), 0u);
    }
    let wrap_x = s.z + 1u == p.kw;
    let wrap_y = wrap_x && s.y + 1u == p.kh;
    return vec3<u32>(s.x + select(0u, 1u, wrap_y), select(select(s.y, s.y + 1u, wrap_x), 0u, wrap_y), select(s.z + 1u, 0u, wrap_x));
}

fn b_elem(i: u32) -> f32 {
    return b4(i / 4u)[i % 4u];
}

// B at k split s for this lane's 4 columns, whose fixed parts of the position are (col_c, col_a, col_b):
// (-, oy*sh - ph, ox*sw - pw) for source 1, (ci, ky*dh - ph, kx*dw - pw) for 2, (-, iy + ph, ix + pw) for 3.
fn conv_b(base: u32, s: vec3<u32>, col_c: vec4<u32>, col_a: vec4<i32>, col_b: vec4<i32>, live: bool) -> vec4<f32> {
    var plane = vec4<u32>(s.x);
    var yy: vec4<i32>;
    var xx: vec4<i32>;
    var dims = vec2<u32>(p.h, p.w);
    if (B_SOURCE == 1u) {
        yy = col_a + i32(s.y * p.dil_h);
        xx = col_b + i32(s.z * p.dil_w);
    } else if (B_SOURCE == 2u) {
        plane = col_c;
        yy = col_a + i32(s.x * p.stride_h);
        xx = col_b + i32(s.y * p.stride_w);
    } else {
        yy = col_a - i32(s.y * p.dil_h);
        xx = col_b - i32(s.z * p.dil_w);
        dims = vec2<u32>(p.oh, p.ow);
    }
    let inside = (yy >= vec4<i32>(0)) & (yy < vec4<i32>(i32(dims.x))) & (xx >= vec4<i32>(0)) & (xx < vec4<i32>(i32(dims.y))) & vec4<bool>(live);
    let at = select(vec4<u32>(0u), vec4<u32>(base) + (plane * dims.x + vec4<u32>(yy)) * dims.y + vec4<u32>(xx), inside);
    return select(vec4<f32>(0.0), vec4<f32>(b_elem(at.x), b_elem(at.y), b_elem(at.z), b_elem(at.w)), inside);
}

// Row-packed columns (PACKED; sources 1 and 3 with a horizontal step of 1): the columns are the output (1) or
// input (3) positions with each image row padded to a multiple of 4, so a lane's 4 columns are 4 neighbours in
// one row and read 4 consecutive image floats: 2 texel fetches instead of 4. The padding columns compute
// zeros and are never stored.
override PACKED: bool = false;

// The image's row length in columns (the output width for source 1, the input width for 3), and padded.
fn packed_width() -> u32 {
    return select(p.ow, p.w, B_SOURCE == 3u);
}

// B at k split s for a lane whose 4 columns sit at image row yy0 and columns xx0 .. xx0 + 4 (before the tap's
// offset), `cols` of them real.
fn conv_b_row(base: u32, s: vec3<u32>, yy0: i32, xx0: i32, cols: u32, live: bool) -> vec4<f32> {
    var yy: i32;
    var xx: i32;
    var dims = vec2<u32>(p.h, p.w);
    if (B_SOURCE == 1u) {
        yy = yy0 + i32(s.y * p.dil_h);
        xx = xx0 + i32(s.z * p.dil_w);
    } else {
        yy = yy0 - i32(s.y * p.dil_h);
        xx = xx0 - i32(s.z * p.dil_w);
        dims = vec2<u32>(p.oh, p.ow);
    }
    let xs = vec4<i32>(xx) + vec4<i32>(0, 1, 2, 3);
    let row_ok = live && yy >= 0 && yy < i32(dims.x);
    let inside = vec4<bool>(row_ok) & (xs >= vec4<i32>(0)) & (xs < vec4<i32>(i32(dims.y))) & (vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(cols));
    // The first float's index (negative only before the first row's start: those lanes are masked) and the two
    // texels that hold the 4 floats.
    let f = i32(base) + (i32(s.x * dims.x) + yy) * i32(dims.y) + xx;
    let q = f >> 2u;
    let o = u32(f & 3);
    let t0 = b4(u32(max(q, 0)));
    let t1 = b4(u32(max(q + 1, 0)));
    let v = select(select(select(t0, vec4<f32>(t0.yzw, t1.x), o == 1u), vec4<f32>(t0.zw, t1.xy), o == 2u), vec4<f32>(t0.w, t1.xyz), o == 3u);
    return select(vec4<f32>(0.0), v, inside);
}

// matmul_subgroup with B from conv_b (or conv_b_row): the same lanes, shuffles and edges.
@compute @workgroup_size(8, 1, 1)
fn conv_gemm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(subgroup_invocation_id) lane: u32) {
    let tile = lane_tile(lid, wid, lane);
    var col_c = vec4<u32>(0u);
    var col_a: vec4<i32>;
    var col_b: vec4<i32>;
    // PACKED: this lane's image row and first column, and how many of its 4 columns are real.
    let width = packed_width();
    let width4 = (width + 3u) / 4u * 4u;
    let img_row = tile.col0 / width4;
    let x0 = tile.col0 % width4;
    let cols = select(0u, min(width - x0, 4u), x0 < width && img_row < p.n / width);
    var yy0: i32;
    var xx0: i32;
    if (B_SOURCE == 1u) {
        col_a = vec4<i32>((tile.cc / p.ow) * p.stride_h) - vec4<i32>(i32(p.pad_h));
        col_b = vec4<i32>((tile.cc % p.ow) * p.stride_w) - vec4<i32>(i32(p.pad_w));
        yy0 = i32(img_row * p.stride_h) - i32(p.pad_h);
        xx0 = i32(x0) - i32(p.pad_w);
    } else if (B_SOURCE == 2u) {
        let taps = p.kh * p.kw;
        col_c = tile.cc / taps;
        col_a = vec4<i32>(((tile.cc % taps) / p.kw) * p.dil_h) - vec4<i32>(i32(p.pad_h));
        col_b = vec4<i32>((tile.cc % p.kw) * p.dil_w) - vec4<i32>(i32(p.pad_w));
    } else {
        col_a = vec4<i32>(tile.cc / p.w + p.pad_h);
        col_b = vec4<i32>(tile.cc % p.w + p.pad_w);
        yy0 = i32(img_row + p.pad_h);
        xx0 = i32(x0 + p.pad_w);
    }
    var acc: array<vec4<f32>, 32>;
    var a_own: array<f32, 32>;
    for (var i = 0u; i < RB; i = i + 1u) { acc[i] = vec4<f32>(0.0); }
    var s = conv_k_split(p.k_begin);
    for (var k0 = p.k_begin; k0 < p.k_end; k0 = k0 + 8u) {
        let k_own = k0 + lid.x;
        for (var i = 0u; i < RB; i = i + 1u) {
            a_own[i] = select(0.0, a_tex_at(tile.a_base, min(tile.row0 + i, p.m - 1u), min(k_own, p.k_end - 1u)), k_own < p.k_end);
        }
        for (var j = 0u; j < 8u; j = j + 1u) {
            var bv: vec4<f32>;
            if (PACKED) {
                bv = conv_b_row(tile.b_base, s, yy0, xx0, cols, k0 + j < p.k_end);
            } else {
                bv = conv_b(tile.b_base, s, col_c, col_a, col_b, k0 + j < p.k_end);
            }
            s = conv_k_next(s);
            for (var i = 0u; i < RB; i = i + 1u) {
                acc[i] = fma(vec4<f32>(subgroupShuffle(a_own[i], tile.first + j)), bv, acc[i]);
            }
        }
    }
    if (!PACKED) {
        store_lane_block(wid.z * p.m * p.n, tile.row0, tile.col0, &acc);
        return;
    }
    let c_base = wid.z * p.m * p.n + img_row * width + x0;
    for (var i = 0u; i < RB; i = i + 1u) {
        let row = tile.row0 + i;
        if (row >= p.m) { break; }
        // A constant trip count (not `cols`): the loop unrolls and acc stays in registers.
        for (var j = 0u; j < 4u; j = j + 1u) {
            let at = c_base + row * p.n + j;
            if (j < cols) { c[at] = acc[i][j] + select(0.0, c[at], ACCUMULATE); }
        }
    }
}
