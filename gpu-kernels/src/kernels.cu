// Baton's CUDA kernels, compiled at run time by NVRTC (see gpu.rs). Each one has a CPU twin
// in the crate that it must agree with (the tests compare them where a GPU is present).
//
// Conventions:
// - f32 everywhere; accumulations are in float, like the CPU twins.
// - Kernels that reduce over a row run one block of exactly BLOCK threads per row (the host
//   always launches BLOCK; the tree reductions rely on it being a power of two).
// - Element-wise kernels use a grid-stride loop, so any grid size is correct.
// - Offsets into big arrays are computed in size_t (n * dim may exceed 2^31).
// - No headers: NVRTC provides expf, logf, sqrtf, fmaxf and size_t; -inf is spelled out.

#define BLOCK 256
#define NEG_INF (__int_as_float(0xff800000))
#define FLT_MIN_POS 1.17549435e-38f

// Block-wide sum of `v` over the BLOCK threads; every thread gets the result.
// `sh` is BLOCK floats of shared memory; ends with a barrier so `sh` can be reused.
__device__ float block_sum(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh[threadIdx.x] += sh[threadIdx.x + s];
        }
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// Block-wide max of `v` (NaN-ignoring, like fmaxf); every thread gets the result.
__device__ float block_max(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        }
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// Masked mean pooling over the sequence axis, then L2 normalisation.
// hidden [batch, seq, dim], mask [batch, seq] (non-zero = real token), out [batch, dim].
// One block per batch row. Twin: pooling::mean_pool_normalize.
extern "C" __global__ void mean_pool_normalize(
    const float* hidden, const long long* mask, float* out, int seq, int dim)
{
    __shared__ float sh[BLOCK];
    const size_t b = blockIdx.x;
    const long long* m = mask + b * (size_t)seq;

    int count = 0;
    for (int s = 0; s < seq; ++s) {
        if (m[s] != 0) {
            count += 1;
        }
    }
    const float inv = count > 0 ? 1.0f / (float)count : 1.0f;

    float sq = 0.0f;
    for (int d = threadIdx.x; d < dim; d += BLOCK) {
        float acc = 0.0f;
        for (int s = 0; s < seq; ++s) {
            if (m[s] != 0) {
                acc += hidden[(b * (size_t)seq + s) * (size_t)dim + d];
            }
        }
        acc *= inv;
        out[b * (size_t)dim + d] = acc;
        sq += acc * acc;
    }
    const float norm = sqrtf(block_sum(sq, sh));
    if (norm > 0.0f) {
        for (int d = threadIdx.x; d < dim; d += BLOCK) {
            out[b * (size_t)dim + d] /= norm;
        }
    }
}

// Cosine similarity of query rows q0 + i (i = blockIdx.y) with every corpus row:
// sims[i * n + j]. queries [q, dim], corpus [n, dim]; grid.x * BLOCK covers j.
// The query row is staged in dynamic shared memory (dim floats). 0 when either norm is 0.
// Twin: pooling::cosine, applied pairwise.
extern "C" __global__ void cosine_sims(
    const float* queries, const float* corpus, float* sims, int q0, int n, int dim)
{
    extern __shared__ float qrow[];
    const size_t i = blockIdx.y;
    const size_t qi = (size_t)q0 + i;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        qrow[d] = queries[qi * (size_t)dim + d];
    }
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) {
        return;
    }
    const float* c = corpus + (size_t)j * (size_t)dim;
    float dot = 0.0f, na = 0.0f, nb = 0.0f;
    for (int d = 0; d < dim; ++d) {
        const float x = qrow[d];
        const float y = c[d];
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    float r;
    if (na == 0.0f || nb == 0.0f) {
        r = 0.0f;
    } else {
        r = dot / (sqrtf(na) * sqrtf(nb));
    }
    sims[i * (size_t)n + j] = r;
}

// Ranking key: NaN ranks below every number.
__device__ float rank_key(float v) {
    return v != v ? NEG_INF : v;
}

// Is candidate (kv, ki) ranked before the current best (bv, bi)? Higher key first, then
// lower index. An empty best has bi = 0x7fffffff.
__device__ bool ranks_before(float kv, int ki, float bv, int bi) {
    return kv > bv || (kv == bv && ki < bi);
}

// Top-k of each row of sims [q, n] by repeated block-wide argmax. One block per row.
// taken [q, n] bytes, zeroed by the host. Writes out_idx / out_val [q, k].
// Twin: pooling::cosine_topk_cpu (same order: similarity descending, ties by index).
extern "C" __global__ void topk_rows(
    const float* sims, unsigned char* taken, int* out_idx, float* out_val, int n, int k)
{
    __shared__ float sv[BLOCK];
    __shared__ int si[BLOCK];
    const size_t row = blockIdx.x;
    const float* s = sims + row * (size_t)n;
    unsigned char* t = taken + row * (size_t)n;
    for (int r = 0; r < k; ++r) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int j = threadIdx.x; j < n; j += BLOCK) {
            if (!t[j]) {
                const float kv = rank_key(s[j]);
                if (ranks_before(kv, j, bv, bi)) {
                    bv = kv;
                    bi = j;
                }
            }
        }
        sv[threadIdx.x] = bv;
        si[threadIdx.x] = bi;
        __syncthreads();
        for (unsigned int h = BLOCK / 2; h > 0; h >>= 1) {
            if (threadIdx.x < h) {
                const float ov = sv[threadIdx.x + h];
                const int oi = si[threadIdx.x + h];
                if (ranks_before(ov, oi, sv[threadIdx.x], si[threadIdx.x])) {
                    sv[threadIdx.x] = ov;
                    si[threadIdx.x] = oi;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            const int best = si[0];  // always < n: k <= n, so an untaken j remains
            t[best] = 1;
            out_idx[row * (size_t)k + r] = best;
            out_val[row * (size_t)k + r] = s[best];
        }
        __syncthreads();  // `t[best] = 1` is visible to the next round's scan
    }
}

// Numerically stable softmax of each row of x [rows, cols] into y. One block per row.
// Twin: head::softmax_rows_cpu.
extern "C" __global__ void softmax_rows(const float* x, float* y, int cols)
{
    __shared__ float sh[BLOCK];
    const size_t row = blockIdx.x;
    const float* xr = x + row * (size_t)cols;
    float* yr = y + row * (size_t)cols;
    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += BLOCK) {
        m = fmaxf(m, xr[c]);
    }
    m = block_max(m, sh);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += BLOCK) {
        const float e = expf(xr[c] - m);
        yr[c] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    for (int c = threadIdx.x; c < cols; c += BLOCK) {
        yr[c] /= sum;
    }
}

// Logits of a linear head: logits[i * classes + c] = bias[c] + W[c] . xs[i].
// One thread per output element (grid-stride). Twin: head::head_forward_cpu.
extern "C" __global__ void head_forward(
    const float* w, const float* bias, const float* xs, float* logits,
    int n, int classes, int dim)
{
    const size_t total = (size_t)n * (size_t)classes;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t i = e / classes;
        const size_t c = e % classes;
        const float* wr = w + c * (size_t)dim;
        const float* x = xs + i * (size_t)dim;
        float acc = 0.0f;
        for (int d = 0; d < dim; ++d) {
            acc += wr[d] * x[d];
        }
        logits[e] = bias[c] + acc;
    }
}

// SGD, step 1 of a mini-batch: for each of the m samples of the batch (positions
// start..start+m of `order`), the softmax of its logits, its cross-entropy loss (written to
// losses[start + t]) and d(mean batch loss)/d(logits) = (p - onehot(y)) / m into
// delta[t * classes + c]. One block per sample; `probs` is scratch [m, classes].
extern "C" __global__ void sgd_batch_delta(
    const float* w, const float* bias, const float* xs, const int* ys, const int* order,
    float* probs, float* delta, float* losses, int start, int m, int classes, int dim)
{
    __shared__ float sh[BLOCK];
    const int t = blockIdx.x;
    const size_t sample = (size_t)order[start + t];
    const float* x = xs + sample * (size_t)dim;
    float* p = probs + (size_t)t * classes;
    float* g = delta + (size_t)t * classes;

    float mx = NEG_INF;
    for (int c = threadIdx.x; c < classes; c += BLOCK) {
        const float* wr = w + (size_t)c * dim;
        float acc = 0.0f;
        for (int d = 0; d < dim; ++d) {
            acc += wr[d] * x[d];
        }
        const float logit = bias[c] + acc;
        p[c] = logit;
        mx = fmaxf(mx, logit);
    }
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < classes; c += BLOCK) {
        const float e = expf(p[c] - mx);
        p[c] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    const int y = ys[sample];
    const float inv_m = 1.0f / (float)m;
    for (int c = threadIdx.x; c < classes; c += BLOCK) {
        const float pc = p[c] / sum;
        p[c] = pc;
        g[c] = (pc - (c == y ? 1.0f : 0.0f)) * inv_m;
        if (c == y) {
            losses[start + t] = -logf(fmaxf(pc, FLT_MIN_POS));
        }
    }
}

// SGD, step 2: W[c][d] -= lr * sum_t delta[t][c] * x_t[d] and bias[c] -= lr * sum_t delta[t][c]
// over the m samples of the batch. One thread per parameter (classes * dim weights, then
// classes biases; grid-stride). Sums run over t in order, like the CPU twin.
extern "C" __global__ void sgd_apply(
    float* w, float* bias, const float* xs, const int* order, const float* delta,
    float lr, int start, int m, int classes, int dim)
{
    const size_t nw = (size_t)classes * (size_t)dim;
    const size_t total = nw + (size_t)classes;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        float grad = 0.0f;
        if (e < nw) {
            const size_t c = e / dim;
            const size_t d = e % dim;
            for (int t = 0; t < m; ++t) {
                const size_t sample = (size_t)order[start + t];
                grad += delta[(size_t)t * classes + c] * xs[sample * (size_t)dim + d];
            }
            w[e] -= lr * grad;
        } else {
            const size_t c = e - nw;
            for (int t = 0; t < m; ++t) {
                grad += delta[(size_t)t * classes + c];
            }
            bias[c] -= lr * grad;
        }
    }
}
