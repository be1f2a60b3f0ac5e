/* The portable path: isa_vec.h's kernels for the compiler's baseline (SSE2 on x86-64, NEON on aarch64),
 * no intrinsics, 128-bit vectors (the width every 64-bit x86 and ARM CPU has). Every CPU runs it. */
#define SFX generic
#define VL 4
#if defined(__aarch64__) /* 32 vector registers: a 4 x 4 tile of the batch products (16 + 4 + 1) */
#define TW 4
#define TX 4
#endif
#define TARGET
#include "isa_vec.h"
#include "wkv_impl.h"

static int setup(void) { return 1; }

isa_table aviary_isa_generic = {
    "generic",
    {F(rows_f32), F(rows_bf16), F(rows_i8)},
    {F(rows_t_f32), F(rows_t_bf16), NULL},
    0,
    F(gla_job), F(delta_job), F(v6_tail_job), F(v7_tail_job),
    F(gate),
    setup,
};
