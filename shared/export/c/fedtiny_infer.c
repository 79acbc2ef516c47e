/* fedtiny_infer: reference C99 runtime; see fedtiny_infer.h. No allocation, no libc beyond <float.h>. */
#include "fedtiny_infer.h"

#include <float.h>

void ft_preprocess(const ft_model *m, const float *pixels, float *x) {
    int plane = m->in_h * m->in_w;
    for (int c = 0; c < m->in_c; c++)
        for (int i = 0; i < plane; i++)
            x[c * plane + i] = (pixels[c * plane + i] / m->divide_by - m->mean[c]) / m->std[c];
}

/* Each kept weight adds w * input[ci][oy * stride + ky - pad][ox * stride + kx - pad] to every output position. */
static void conv2d(const ft_layer *l, const float *in, float *out) {
    int plane = l->out_h * l->out_w, k = 0;
    for (int o = 0; o < l->out_c; o++) {
        float *y = out + o * plane;
        for (int i = 0; i < plane; i++) y[i] = l->bias[o];
        for (int n = 0; n < l->row_nnz[o]; n++, k++) {
            int col = l->col[k], kx = col % l->kernel_w, ky = (col / l->kernel_w) % l->kernel_h;
            int ci = col / (l->kernel_w * l->kernel_h);
            const float *x = in + ci * l->in_h * l->in_w;
            float w = l->val[k];
            for (int oy = 0; oy < l->out_h; oy++) {
                int iy = oy * l->stride_h + ky - l->pad_h;
                if (iy < 0 || iy >= l->in_h) continue;
                for (int ox = 0; ox < l->out_w; ox++) {
                    int ix = ox * l->stride_w + kx - l->pad_w;
                    if (ix >= 0 && ix < l->in_w) y[oy * l->out_w + ox] += w * x[iy * l->in_w + ix];
                }
            }
        }
    }
}

static void linear(const ft_layer *l, const float *in, float *out) {
    int k = 0;
    for (int o = 0; o < l->out_c; o++) {
        float acc = l->bias[o];
        for (int n = 0; n < l->row_nnz[o]; n++, k++) acc += l->val[k] * in[l->col[k]];
        out[o] = acc;
    }
}

static void maxpool2d(const ft_layer *l, const float *in, float *out) {
    for (int c = 0; c < l->out_c; c++)
        for (int oy = 0; oy < l->out_h; oy++)
            for (int ox = 0; ox < l->out_w; ox++) {
                float best = -FLT_MAX;
                for (int ky = 0; ky < l->kernel_h; ky++) {
                    int iy = oy * l->stride_h + ky - l->pad_h;
                    if (iy < 0 || iy >= l->in_h) continue;
                    for (int kx = 0; kx < l->kernel_w; kx++) {
                        int ix = ox * l->stride_w + kx - l->pad_w;
                        if (ix < 0 || ix >= l->in_w) continue;
                        float v = in[(c * l->in_h + iy) * l->in_w + ix];
                        if (v > best) best = v;
                    }
                }
                out[(c * l->out_h + oy) * l->out_w + ox] = best;
            }
}

static void global_avgpool(const ft_layer *l, const float *in, float *out) {
    int plane = l->in_h * l->in_w;
    for (int c = 0; c < l->in_c; c++) {
        float sum = 0.0f;
        for (int i = 0; i < plane; i++) sum += in[c * plane + i];
        out[c] = sum / (float)plane;
    }
}

int ft_infer(const ft_model *m, const float *x, float *logits, float *scratch) {
    float *buf[2] = {scratch, scratch + m->max_floats};
    const float *in = x;
    int next = 0;
    for (int i = 0; i < m->num_layers; i++) {
        const ft_layer *l = &m->layers[i];
        float *out = buf[next];
        switch (l->op) {
            case FT_CONV2D: conv2d(l, in, out); break;
            case FT_LINEAR: linear(l, in, out); break;
            case FT_MAXPOOL2D: maxpool2d(l, in, out); break;
            case FT_GLOBAL_AVGPOOL: global_avgpool(l, in, out); break;
            case FT_RELU: {
                int n = l->in_c * l->in_h * l->in_w;
                for (int j = 0; j < n; j++) out[j] = in[j] > 0.0f ? in[j] : 0.0f;
                break;
            }
            default: return -1;
        }
        in = out;
        next = 1 - next;
    }
    for (int j = 0; j < m->num_classes; j++) logits[j] = in[j];
    return 0;
}
