// The paged pool's CUDA kernels: `qkv_rope_write` (RoPE, and the step's keys and values into the
// pool) and `paged_decode_attention` (decode attention straight from the pool).
//
// Decode attention: one block per (query head, sequence). Replaces, per layer: two gathers of every sequence's history into padded copies, the score
// matmul, the padding mask, the softmax and the value matmul (about ten kernels, each costing more
// host time to launch than the device needs to run it at small batches). Compiled at run time with
// NVRTC (no headers: half and bfloat16 are converted by hand, in `cuda_types.cuh`, which the Rust
// side puts in front of this file), so the build needs no nvcc step.
//
// Layouts (element type T is float, __half bits or __nv_bfloat16 bits):
//   q       [sequences, heads, D]          the step's queries, RoPE applied
//   keys    [kv_heads, pool_rows, D]       one layer of the pool (values alike)
//   gather  [sequences, len]               pool row of each position (only the first lens[s] are read)
//   lens    [sequences]                    history length of each sequence, new position included
//   out     [sequences, heads, D]
// Each warp walks a share of the positions with an online softmax in f32; the block's warps are
// merged at the end. Every lane owns D/32 consecutive dimensions, so a warp reads a row as one
// coalesced transaction. A warp's positions follow each other (load, reduce, rescale), so long
// histories use the wide variant: 32 warps instead of 8, four times the positions in flight.

#define TILE 4
#define MAX_PER_LANE 8

template <typename T, int WARPS>
__device__ void paged_decode_attention(
    const T *__restrict__ q, const T *__restrict__ keys, const T *__restrict__ values,
    const unsigned int *__restrict__ gather, const unsigned int *__restrict__ lens,
    T *__restrict__ out, int heads, int kv_heads, int d, int pool_rows, int len, float scale) {
    const int head = blockIdx.x;
    const int seq = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int per_lane = d / 32;
    const int kv_head = head / (heads / kv_heads);
    const int history = (int)lens[seq];

    float qv[MAX_PER_LANE];
    float acc[MAX_PER_LANE];
    const T *q_row = q + ((unsigned long long)seq * heads + head) * d + lane * per_lane;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        qv[i] = i < per_lane ? to_float(q_row[i]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    const unsigned long long head_base = (unsigned long long)kv_head * pool_rows * d + lane * per_lane;
    const unsigned int *rows = gather + (unsigned long long)seq * len;

    float m = NEG_INF;
    float l = 0.0f;
    for (int base = warp * TILE; base < history; base += WARPS * TILE) {
        float score[TILE];
        // Scores of the tile's positions first (independent loads in flight together) ...
#pragma unroll
        for (int t = 0; t < TILE; t++) {
            const int p = base + t;
            float part = 0.0f;
            if (p < history) {
                const T *k = keys + head_base + (unsigned long long)rows[p] * d;
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++) {
                    if (i < per_lane) part += qv[i] * to_float(k[i]);
                }
            }
            score[t] = warp_sum(part);
        }
        // ... then one rescale of the running sums for the whole tile.
        float tile_max = score[0];
#pragma unroll
        for (int t = 1; t < TILE; t++) {
            if (base + t < history) tile_max = fmaxf(tile_max, score[t]);
        }
        const float m_new = fmaxf(m, tile_max);
        const float correction = expf(m - m_new);
        l *= correction;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) acc[i] *= correction;
#pragma unroll
        for (int t = 0; t < TILE; t++) {
            const int p = base + t;
            if (p < history) {
                const float w = expf(score[t] - m_new);
                l += w;
                const T *v = values + head_base + (unsigned long long)rows[p] * d;
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++) {
                    if (i < per_lane) acc[i] += w * to_float(v[i]);
                }
            }
        }
        m = m_new;
    }

    // Merge the warps: each one's (max, sum, weighted values) rescaled to the block's max.
    __shared__ float warp_max[WARPS];
    __shared__ float warp_sum_exp[WARPS];
    __shared__ float warp_acc[WARPS][32 * MAX_PER_LANE];
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum_exp[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        if (i < per_lane) warp_acc[warp][lane * per_lane + i] = acc[i];
    }
    __syncthreads();
    float block_max = NEG_INF;
    for (int w = 0; w < WARPS; w++) block_max = fmaxf(block_max, warp_max[w]);
    float total = 0.0f;
    for (int w = 0; w < WARPS; w++) {
        if (warp_max[w] != NEG_INF) total += warp_sum_exp[w] * expf(warp_max[w] - block_max);
    }
    T *out_row = out + ((unsigned long long)seq * heads + head) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            if (warp_max[w] != NEG_INF) o += warp_acc[w][i] * expf(warp_max[w] - block_max);
        }
        store(&out_row[i], o / total);
    }
}

// RoPE on a step's queries and keys and the keys and values written into the pool, in one pass
// over the fused q/k/v projection (replacing three reshape copies, two RoPE kernels, two transposes
// and two scatters per layer). One block per row:
//   y       [rows, (heads + 2 kv_heads) * D] (row stride y_stride): q heads, k heads, v heads
//   cos/sin [n, D/2]                        RoPE tables: row r rotates by row angle_row[r]
//   angle_row [rows]
//   write   [rows]                          the pool row of each new position
//   q_out   [rows, heads, D]                rotated queries
//   keys, values [kv_heads, pool_rows, D]   rotated keys and raw values land at row write[r]
// `interleaved` picks the GGUF pairing (2i, 2i+1); otherwise halves (i, i + D/2), as Hugging Face.
template <typename T>
__device__ void qkv_rope_write(const T *__restrict__ y, int y_stride, const T *__restrict__ cos,
                               const T *__restrict__ sin,
                               const unsigned int *__restrict__ angle_row,
                               const unsigned int *__restrict__ write,
                               T *__restrict__ q_out, T *__restrict__ keys, T *__restrict__ values,
                               int heads, int kv_heads, int d, int pool_rows, int interleaved) {
    const int row = blockIdx.x;
    const int half = d / 2;
    const T *y_row = y + (unsigned long long)row * y_stride;
    const T *c = cos + (unsigned long long)angle_row[row] * half;
    const T *s = sin + (unsigned long long)angle_row[row] * half;
    const unsigned long long pool_row = write[row];
    const int pairs = (heads + kv_heads) * half;
    for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
        const int h = idx / half;
        const int i = idx % half;
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const T *x = y_row + h * d;
        const float xa = to_float(x[a]);
        const float xb = to_float(x[b]);
        const float cc = to_float(c[i]);
        const float ss = to_float(s[i]);
        T *dst = h < heads ? q_out + ((unsigned long long)row * heads + h) * d
                           : keys + ((unsigned long long)(h - heads) * pool_rows + pool_row) * d;
        store(&dst[a], xa * cc - xb * ss);
        store(&dst[b], xa * ss + xb * cc);
    }
    const T *v = y_row + (heads + kv_heads) * d;
    for (int idx = threadIdx.x; idx < kv_heads * d; idx += blockDim.x) {
        const int h = idx / d;
        const int j = idx % d;
        values[((unsigned long long)h * pool_rows + pool_row) * d + j] = v[h * d + j];
    }
}

#define INSTANTIATE_WRITE(NAME, T)                                                               \
    extern "C" __global__ void NAME(const T *y, int y_stride, const T *cos, const T *sin,        \
                                    const unsigned int *angle_row, const unsigned int *write,    \
                                    T *q_out, T *keys, T *values, int heads, int kv_heads, int d, \
                                    int pool_rows, int interleaved) {                             \
        qkv_rope_write<T>(y, y_stride, cos, sin, angle_row, write, q_out, keys, values, heads,    \
                          kv_heads, d, pool_rows, interleaved);                                   \
    }

INSTANTIATE_WRITE(qkv_rope_write_f32, float)
INSTANTIATE_WRITE(qkv_rope_write_bf16, bf16_t)
INSTANTIATE_WRITE(qkv_rope_write_f16, f16_t)

#define INSTANTIATE(NAME, T, WARPS)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                    \
        NAME(const T *q, const T *keys, const T *values, const unsigned int *gather,             \
             const unsigned int *lens, T *out, int heads, int kv_heads, int d, int pool_rows,     \
             int len, float scale) {                                                              \
        paged_decode_attention<T, WARPS>(q, keys, values, gather, lens, out, heads, kv_heads, d, \
                                         pool_rows, len, scale);                                 \
    }

INSTANTIATE(paged_decode_attention_f32, float, 8)
INSTANTIATE(paged_decode_attention_bf16, bf16_t, 8)
INSTANTIATE(paged_decode_attention_f16, f16_t, 8)
INSTANTIATE(paged_decode_attention_wide_f32, float, 32)
INSTANTIATE(paged_decode_attention_wide_bf16, bf16_t, 32)
INSTANTIATE(paged_decode_attention_wide_f16, f16_t, 32)
