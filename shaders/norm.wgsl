// RMSNorm: out = weight * (x * 1 / sqrt(mean(x²) + eps)), one workgroup per row. The sum of squares is a workgroup tree reduction in f32
// (the CPU sums in f64; the difference is far inside the float tolerance).

const WG: u32 = 64u;

// Mirrors `NormParams` in src/backend/wgpu/params.rs.
struct NormParams {
    tokens: u32,
    width: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> p: NormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(64)
fn rms_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let width = p.width;
    let row = wid.x + wid.y * nwg.x;
    let valid = row < p.tokens;
    var s = 0.0;
    if valid {
        for (var k = lid; k < width; k += WG) {
            let v = x[row * width + k];
            s += v * v;
        }
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    if valid {
        let inv = 1.0 / sqrt(partial[0] / f32(width) + p.eps);
        for (var k = lid; k < width; k += WG) {
            out[row * width + k] = weight[k] * (x[row * width + k] * inv);
        }
    }
}
