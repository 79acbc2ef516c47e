/* A tiny host program around fedtiny_infer: float32 inputs on stdin, one line of logits per input.
 *
 * Build: cc -O2 -std=c99 -DFEDTINY_MODEL_HEADER='"model.h"' fedtiny_main.c fedtiny_infer.c -o infer
 * Run:   ./infer [--pixels] < inputs.f32   (--pixels: raw pixel values, preprocessed here first)
 * Inputs are little-endian float32, in_c * in_h * in_w per example, channel-major as in torch.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef FEDTINY_MODEL_HEADER
#define FEDTINY_MODEL_HEADER "model.h"
#endif
#include FEDTINY_MODEL_HEADER

int main(int argc, char **argv) {
    const ft_model *m = &fedtiny_model;
    int pixels = argc > 1 && strcmp(argv[1], "--pixels") == 0;
    size_t n = (size_t)m->in_c * m->in_h * m->in_w;
    float *raw = malloc(n * sizeof(float)), *x = malloc(n * sizeof(float));
    float *scratch = malloc(2 * (size_t)m->max_floats * sizeof(float));
    float *logits = malloc((size_t)m->num_classes * sizeof(float));
    if (!raw || !x || !scratch || !logits) return 1;
    while (fread(raw, sizeof(float), n, stdin) == n) {
        if (pixels) ft_preprocess(m, raw, x); else memcpy(x, raw, n * sizeof(float));
        if (ft_infer(m, x, logits, scratch) != 0) return 2;
        for (int j = 0; j < m->num_classes; j++) printf(j ? " %.9g" : "%.9g", logits[j]);
        printf("\n");
    }
    return 0;
}
