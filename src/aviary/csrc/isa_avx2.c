/* AVX2 + FMA (Intel since Haswell, AMD since Zen 1): isa_vec.h's kernels compiled for 256-bit
 * registers with fused multiply-adds; bfloat16 and int8 weights are widened to float32 in registers. */
#include "kernels.h"
#ifdef AVIARY_X86
#define SFX avx2
#define VL 8
#define TARGET __attribute__((target("avx2,fma")))
#define AVX2_I8_INSTRUCTIONS /* int8 widened by vpmovsxbd (measured faster than isa_vec.h's shifts, docs/cpu.md) */
#include "isa_vec.h"
#include "wkv_impl.h"

static int setup(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

isa_table aviary_isa_avx2 = {
    "avx2",
    {F(rows_f32), F(rows_bf16), F(rows_i8)},
    {F(rows_t_f32), F(rows_t_bf16), NULL},
    0,
    F(gla_job), F(delta_job), F(v6_tail_job), F(v7_tail_job),
    F(gate),
    setup,
};
#endif
