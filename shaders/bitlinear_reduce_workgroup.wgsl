// tile_sum for bitlinear.wgsl without subgroups: every lane adds into the shared atomic.
fn tile_sum(slot: u32, v: i32) {
    if v != 0 {
        atomicAdd(&sums[slot], v);
    }
}
