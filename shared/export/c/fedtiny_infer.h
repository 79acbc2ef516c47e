/* fedtiny_infer: a reference C99 runtime for models written by `fedtiny export --format c`.
 *
 * Why: a microcontroller has no Python; it needs the weights as arrays and a few loops. A model
 * header (the export) holds each conv / linear layer's kept weights in compressed sparse rows,
 * batch norm folded in: per output channel the count of kept weights (row_nnz), then for each
 * kept weight its column (uint16) and value (float). This file runs the layers the built-in CNNs
 * use: conv2d (zero padding, any stride), linear, ReLU, max pooling, global average pooling.
 * Activations are float32, channel-major (C, H, W), as in torch; flatten is a no-op.
 */
#ifndef FEDTINY_INFER_H
#define FEDTINY_INFER_H

#include <stdint.h>

typedef enum {
    FT_CONV2D = 1,          /* sparse rows: column = (ci * kernel_h + ky) * kernel_w + kx */
    FT_LINEAR = 2,          /* sparse rows: column = input feature */
    FT_RELU = 3,            /* in place */
    FT_MAXPOOL2D = 4,       /* windows clipped to the input (ceil mode and padding as in torch) */
    FT_GLOBAL_AVGPOOL = 5   /* AdaptiveAvgPool2d(1) */
} ft_op;

typedef struct {
    ft_op op;
    int in_c, in_h, in_w;       /* input shape; linear: in_c features, in_h = in_w = 1 */
    int out_c, out_h, out_w;    /* output shape */
    int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;  /* conv and max pool */
    const uint16_t *row_nnz;    /* conv / linear: kept weights of each output channel */
    const uint16_t *col;        /* conv / linear: column of each kept weight, row after row */
    const float *val;           /* conv / linear: value of each kept weight (BN folded) */
    const float *bias;          /* conv / linear: one per output channel */
} ft_layer;

typedef struct {
    int num_layers;
    const ft_layer *layers;
    int in_c, in_h, in_w, num_classes;
    int max_floats;             /* largest activation in floats: ft_infer's scratch holds 2 * max_floats */
    const float *mean, *std;    /* per input channel, applied by ft_preprocess */
    float divide_by;            /* 255 for uint8 images, 1 for float images */
} ft_model;

/* x[c][y][x] = (pixels[c][y][x] / divide_by - mean[c]) / std[c]: what training applied. */
void ft_preprocess(const ft_model *m, const float *pixels, float *x);

/* Logits (num_classes floats) of one preprocessed input (in_c * in_h * in_w floats).
 * scratch: 2 * max_floats floats. Returns 0, or -1 for a layer this runtime does not know. */
int ft_infer(const ft_model *m, const float *x, float *logits, float *scratch);

#endif
