// tile_sum for bitlinear.wgsl with Features::SUBGROUP: one shared atomic per subgroup, not per lane.
// The first active lane (exclusive prefix count 0) publishes the subgroup's total.
fn tile_sum(slot: u32, v: i32) {
    let total = subgroupAdd(v);
    if subgroupExclusiveAdd(1u) == 0u {
        atomicAdd(&sums[slot], total);
    }
}
