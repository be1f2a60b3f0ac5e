/* Which instruction sets this build has, which of them this CPU runs, and the one in use. */
#include "kernels.h"

const int64_t aviary_wsize[3] = {4, 2, 1};

isa_table *const aviary_isas[] = {
#ifdef AVIARY_X86
    &aviary_isa_avx512,
    &aviary_isa_avx2,
#endif
    &aviary_isa_generic,
    NULL,
};

const isa_table *aviary_isa = &aviary_isa_generic;

const isa_table *aviary_isa_find(const char *name) {
    for (int i = 0; aviary_isas[i] != NULL; i++)
        if (strcmp(aviary_isas[i]->name, name) == 0) return aviary_isas[i]->setup() ? aviary_isas[i] : NULL;
    return NULL;
}

void aviary_isa_init(void) {
    for (int i = 0; aviary_isas[i] != NULL; i++)
        if (aviary_isas[i]->setup()) {
            aviary_isa = aviary_isas[i];
            return;
        }
}

void aviary_linear_job(const void *ctx, int64_t o0, int64_t o1) {
    const linear_args *a = ctx;
    a->fn(a->w, a->scale, a->x, a->y, o0, o1, a->in, a->out, a->M);
}
