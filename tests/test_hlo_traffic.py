"""The traffic breakdown: bytes of a hand-written module counted by hand, names mapped to model parts."""
from vfocal_jax import hlo_traffic

# A module in the form XLA prints after compiling for a TPU: tiled layouts, an on-chip (S(1))
# buffer, a while loop the compiler knows runs 3 times, a two-way conditional, an async copy.
MODULE = """HloModule jit_train_step, entry_computation_layout={...}

%fused_computation.1 (param_0: f32[8,128]) -> f32[8,128] {
  %param_0 = f32[8,128]{1,0} parameter(0)
  ROOT %neg = f32[8,128]{1,0} negate(%param_0)
}

%body.2 (p: (s32[], f32[16,128])) -> (s32[], f32[16,128]) {
  %p = (s32[], f32[16,128]{1,0}) parameter(0)
  %x = f32[16,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %m.1 = f32[16,128]{1,0:T(8,128)} multiply(%x, %x), metadata={op_name="jit(train_step)/jvp(VideoFocalNet)/layers_1/blocks_0/mlp/fc1/mul"}
  ROOT %t = (s32[], f32[16,128]{1,0}) tuple(%x, %m.1)
}

%cond.3 (p: (s32[], f32[16,128])) -> pred[] {
  %p = (s32[], f32[16,128]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%branch_a (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  ROOT %e = f32[4,4]{1,0} exponential(%a), metadata={op_name="jit(train_step)/mixup/exp"}
}

%branch_b (b: f32[4,4]) -> f32[4,4] {
  %b = f32[4,4]{1,0} parameter(0)
  %n = f32[4,4]{1,0} negate(%b), metadata={op_name="jit(train_step)/mixup/neg"}
  ROOT %n2 = f32[4,4]{1,0} negate(%n), metadata={op_name="jit(train_step)/mixup/neg"}
}

ENTRY %main.9_spmd (param.1: f32[3,100], param.2: bf16[2,7,5]) -> f32[8,128] {
  %param.1 = f32[3,100]{1,0:T(8,128)} parameter(0)
  %param.2 = bf16[2,7,5]{2,1,0:T(8,128)(2,1)S(1)} parameter(1)
  %big = f32[64,128]{1,0:T(8,128)} parameter(2)
  %fusion.1 = f32[8,128]{1,0:T(8,128)} fusion(%param.1), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/transpose(jvp(VideoFocalNet))/layers_0/blocks_1/modulation/modulation._temporal/f_temporal/conv"}, backend_config={"estimated_cycles":"40"}
  %copy-start.1 = (f32[3,100]{1,0:T(8,128)S(1)}, f32[3,100]{1,0:T(8,128)}, u32[]) copy-start(%param.1)
  %copy-done.1 = f32[3,100]{1,0:T(8,128)S(1)} copy-done(%copy-start.1)
  %slice-start.1 = ((f32[64,128]{1,0:T(8,128)}), f32[8,128]{1,0:T(8,128)}, s32[]) slice-start(%big), slice={[0:8], [0:128]}
  %slice-done.1 = f32[8,128]{1,0:T(8,128)} slice-done(%slice-start.1)
  %custom-call.1 = f32[64,128]{1,0:T(8,128)} custom-call(%big), custom_call_target="ConcatBitcast"
  %all-reduce.1 = bf16[2,7,5]{2,1,0:T(8,128)(2,1)S(1)} all-reduce(%param.2), replica_groups={}, to_apply=%add, metadata={op_name="jit(train_step)/reduce_sum"}, backend_config={"estimated_cycles":"10"}
  %init = (s32[], f32[16,128]{1,0}) tuple(%param.1, %fusion.1)
  %while.1 = (s32[], f32[16,128]{1,0}) while(%init), condition=%cond.3, body=%body.2, backend_config={"known_trip_count":{"n":"3"}}
  %sel = s32[] constant(0)
  %small = f32[4,4]{1,0} constant({...})
  %conditional.1 = f32[4,4]{1,0} conditional(%sel, %small, %small), branch_computations={%branch_a, %branch_b}
  ROOT %out = f32[8,128]{1,0:T(8,128)} add(%fusion.1, %fusion.1), metadata={op_name="jit(train_step)/optimizer/add"}, backend_config={"estimated_cycles":"50"}
}
"""

F32_TILE = 8 * 128 * 4                   # One f32 (8, 128) tile.
PARAM_1 = F32_TILE                       # f32[3,100] padded to [8,128].
PARAM_2 = 2 * 8 * 128 * 2                # bf16[2,7,5] with its two minor dims padded to (8,128): on chip.


def _ops():
  return {op.name: op for op in hlo_traffic.ops_of_module(MODULE)}


def test_bytes_count_operands_and_results_with_tiles_padded():
  ops = _ops()
  assert ops["fusion.1"].hbm_bytes == PARAM_1 + F32_TILE and ops["fusion.1"].cycles == 40
  assert ops["copy-start.1"].hbm_bytes == PARAM_1 and ops["copy-start.1"].on_chip_bytes == PARAM_1
  assert ops["all-reduce.1"].on_chip_bytes == 2 * PARAM_2 and ops["all-reduce.1"].hbm_bytes == 0
  assert ops["out"].hbm_bytes == 3 * F32_TILE
  assert ops["slice-start.1"].hbm_bytes == 2 * F32_TILE  # Reads and writes the slice, not all of %big.
  # Free ops (parameters, tuples, constants, the -done half of an async pair) move nothing.
  assert not {"param.1", "init", "copy-done.1", "slice-done.1", "custom-call.1", "sel", "small", "x", "t"} & set(ops)


def test_loops_count_their_trips_and_branches_their_mean():
  ops = _ops()
  # multiply(x, x) of f32[16,128] (two tiles) read twice and written once, 3 trips.
  assert ops["m.1"].count == 3 and ops["m.1"].hbm_bytes == 3 * 3 * (2 * F32_TILE)
  assert ops["e"].count == 0.5 and ops["e"].hbm_bytes == 0.5 * 2 * 64
  assert ops["n"].count == 0.5 and ops["n2"].hbm_bytes == 0.5 * 2 * 64


def test_parts_from_name_stacks():
  ops = _ops()
  assert ops["fusion.1"].part == "stage0.block1.temporal bwd"
  assert ops["m.1"].part == "stage1.block0.mlp fwd"
  assert ops["all-reduce.1"].part == "collectives"
  assert ops["copy-start.1"].part == "prefetch"
  assert ops["e"].part == "mixup" and ops["out"].part == "optimizer"
  assert hlo_traffic.part_of("jit(eval_step)/VideoFocalNet/patch_embed/proj/conv") == "stem fwd"
  assert hlo_traffic.part_of("jit(f)/jvp(VideoFocalNet)/layers_2/downsample/norm/mul") == "stage2.downsample fwd"
  assert hlo_traffic.part_of("jit(f)/jvp(VideoFocalNet)/layers_2/blocks_3/modulation/mul") == "stage2.block3.gating fwd"
  assert hlo_traffic.part_of("jit(f)/jvp(VideoFocalNet)/head/dot_general") == "head fwd"
  assert hlo_traffic.part_of("jit(f)/mul") == "other"
  assert hlo_traffic.part_of("jit(train_step)/transpose(jvp(loss))/jit(log_softmax)/div") == "loss"
  assert hlo_traffic.part_of("jit(train_step)/lossy/mul") == "other"


def test_breakdown_parts_add_up_to_the_total():
  b = hlo_traffic.breakdown(MODULE, per=2.0)
  assert b["bytes"] == sum(r["bytes"] for r in b["by_part"]) == sum(r["bytes"] for r in b["by_component"])
  assert b["bytes"] == sum(op.bytes for op in hlo_traffic.ops_of_module(MODULE)) / 2
  assert b["estimated_cycles"] == 100
  assert b["top_by_bytes"][0]["name"] == "m.1"
  assert "temporal bwd" in hlo_traffic.format_breakdown(b, "train")
