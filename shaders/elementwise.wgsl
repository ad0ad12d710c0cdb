// Element-wise ops, one invocation per output element (index = x + y * 65535-wide rows of groups).

const WG: u32 = 64u;

fn element(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// ---- gated ----------------------------------------------------------------------------------
// Rows of gate_up are gate‖up (2·width); out[t][i] = act(gate[t][i]) * up[t][i]. Kept in f32:
// ReLU² overflows f16.

// Mirrors `GatedParams` in src/backend/wgpu/params.rs.
struct GatedParams {
    tokens: u32,
    width: u32,
    activation: u32, // 0: ReLU², 1: SiLU
}

@group(0) @binding(0) var<storage, read> gated_p: GatedParams;
@group(0) @binding(1) var<storage, read> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read_write> gated_out: array<f32>;

@compute @workgroup_size(64)
fn gated(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let width = gated_p.width;
    let i = element(wid, nwg, lid);
    if i >= gated_p.tokens * width {
        return;
    }
    let t = i / width;
    let g = gate_up[2u * width * t + i % width];
    let u = gate_up[2u * width * t + width + i % width];
    var a: f32;
    if gated_p.activation == 0u {
        let r = max(g, 0.0);
        a = r * r;
    } else {
        a = g / (1.0 + exp(-g));
    }
    gated_out[i] = a * u;
}

// ---- add: acc[i] += addend[i] -------------------------------------------------------------------

// Mirrors `AddParams` in src/backend/wgpu/params.rs.
struct AddParams {
    len: u32,
}

@group(0) @binding(3) var<storage, read> add_p: AddParams;
@group(0) @binding(4) var<storage, read_write> acc: array<f32>;
@group(0) @binding(5) var<storage, read> addend: array<f32>;

@compute @workgroup_size(64)
fn add(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i < add_p.len {
        acc[i] += addend[i];
    }
}
