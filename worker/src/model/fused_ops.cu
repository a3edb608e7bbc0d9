// Small fusions of a GPU stage's elementwise work on CUDA (`fused_ops.rs`). At batch 1 a
// GPU stage is bound by launching kernels, not by running them, so each launch saved is time saved:
//   add_rms_norm  the residual add and the next RMSNorm in one pass (two kernels before);
//   silu_mul      SiLU(gate) · up straight from the fused gate/up projection (two kernels before);
//   greedy_rows   the last stage's greedy token and its log-probability per row (a dozen before).
// Sums are kept in f32 and each output is rounded to the element type once.

// One block per row: sum = x + delta (stored, then read back rounded as the unfused add would
// leave it), normed = sum · rsqrt(mean(sum²) + eps) · weight.
//   x, delta, sum, normed [rows, hidden]; weight [hidden]
template <typename T>
__device__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ delta,
                             const T *__restrict__ weight, T *__restrict__ sum,
                             T *__restrict__ normed, int hidden, float eps) {
    const unsigned long long base = (unsigned long long)blockIdx.x * hidden;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        store(&sum[base + i], to_float(x[base + i]) + to_float(delta[base + i]));
        const float s = to_float(sum[base + i]);
        squares += s * s;
    }
    // Block-wide sum of squares: each warp's, then the first warp's over those.
    __shared__ float partial[32];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    squares = warp_sum(squares);
    if (lane == 0) partial[warp] = squares;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) / 32;
        float total = lane < warps ? partial[lane] : 0.0f;
        total = warp_sum(total);
        if (lane == 0) partial[0] = total;
    }
    __syncthreads();
    const float scale = rsqrtf(partial[0] / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        store(&normed[base + i], to_float(sum[base + i]) * scale * to_float(weight[i]));
    }
}

// out[r, i] = silu(y[r, i]) · y[r, width + i] for the fused projection y = [gate | up] (row stride
// y_stride); grid (ceil(width / blockDim), rows).
template <typename T>
__device__ void silu_mul(const T *__restrict__ y, int y_stride, T *__restrict__ out, int width) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width) return;
    const unsigned long long row = blockIdx.y;
    const T *y_row = y + row * y_stride;
    const float gate = to_float(y_row[i]);
    const float up = to_float(y_row[width + i]);
    store(&out[row * width + i], gate / (1.0f + expf(-gate)) * up);
}

#define INSTANTIATE(T, SUFFIX)                                                                  \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *delta,                \
                                                     const T *weight, T *sum, T *normed,        \
                                                     int hidden, float eps) {                   \
        add_rms_norm<T>(x, delta, weight, sum, normed, hidden, eps);                            \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *y, int y_stride, T *out, int width) { \
        silu_mul<T>(y, y_stride, out, width);                                                   \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
INSTANTIATE(f16_t, f16)

// The warp's largest value and its index, in every lane: a larger value wins, and between equal
// values the lower index.
__device__ __forceinline__ void warp_argmax(float &best, unsigned int &index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, offset);
        const unsigned int j = __shfl_xor_sync(0xffffffffu, index, offset);
        if (v > best || (v == best && j < index)) {
            best = v;
            index = j;
        }
    }
}

// Greedy choice per row of f32 logits [rows, vocab], one block per row: the lowest index holding
// the row's largest value (NaN never compares larger, so it is skipped; an all-NaN row gives index
// 0xffffffff), and that value's log-probability -ln Σ exp(x - max). Writes out[r] = index and
// out[rows + r] = the log-probability's bits, so that one copy brings both back.
extern "C" __global__ void greedy_rows_f32(const float *__restrict__ logits, int vocab, int rows,
                                           unsigned int *__restrict__ out) {
    const float *row = logits + (unsigned long long)blockIdx.x * vocab;
    float best = NEG_INF;
    unsigned int best_index = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = row[i];
        // Each thread walks its indexes upwards: a later equal value never wins.
        if (x > best) {
            best = x;
            best_index = i;
        }
    }
    __shared__ float values[32];
    __shared__ unsigned int indexes[32];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int warps = (blockDim.x + 31) / 32;
    warp_argmax(best, best_index);
    if (lane == 0) {
        values[warp] = best;
        indexes[warp] = best_index;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? values[lane] : NEG_INF;
        best_index = lane < warps ? indexes[lane] : 0xffffffffu;
        warp_argmax(best, best_index);
        if (lane == 0) {
            values[0] = best;
            indexes[0] = best_index;
        }
    }
    __syncthreads();
    const float max = values[0];
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        sum += expf(row[i] - max);
    }
    __syncthreads();  // values[0] was read by every thread before it is reused below
    sum = warp_sum(sum);
    if (lane == 0) values[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < warps; ++w) total += values[w];
        out[blockIdx.x] = indexes[0];
        out[rows + blockIdx.x] = __float_as_uint(-logf(total));
    }
}
