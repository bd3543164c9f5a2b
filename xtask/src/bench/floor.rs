//! The memory-bandwidth floor of LLM decode: decoding one token must read
//! every weight but the embedding table (of which one row), plus the K/V
//! cache up to the current position, so no implementation can decode faster
//! than those bytes divided by the machine's read bandwidth. A decode time
//! close to the floor means the kernels are not what limits it.
//!
//! The bandwidth is measured the way decode uses memory: every thread
//! streams through its share of one large buffer and reduces it, nothing is
//! written. Copy bandwidth (STREAM's Copy) is the wrong yardstick here: it
//! also pays for the writes and the write-allocate reads, so it is lower
//! than what a matrix-vector product can reach.

use super::models::LlmSpec;
use emu_core::{DType, QuantType};
use std::time::Instant;

/// What decode must read per token, and how fast this machine reads.
#[derive(Debug, Clone, Copy)]
pub struct DecodeFloor {
    pub weight_bytes: usize,
    /// K and V of every layer at the mean position of the timed decode steps.
    pub kv_bytes: usize,
    /// Host read bandwidth in bytes/s ([`read_bandwidth`]).
    pub bandwidth: f64,
}

impl DecodeFloor {
    pub fn ms_per_token(&self) -> f64 {
        (self.weight_bytes + self.kv_bytes) as f64 / self.bandwidth * 1e3
    }

    pub fn tokens_per_s(&self) -> f64 {
        1e3 / self.ms_per_token()
    }
}

/// Weight elements a decode step reads: every projection, norm and the LM
/// head, one embedding row.
pub fn decode_weight_elems(l: &LlmSpec) -> usize {
    let head_dim = l.hidden / l.heads;
    let kv = l.kv_heads * head_dim;
    let per_layer = 2 * l.hidden * l.hidden // q_proj, o_proj
        + 2 * l.hidden * kv // k_proj, v_proj
        + 3 * l.hidden * l.intermediate // gate, up, down
        + 2 * l.hidden; // the two RMS norms
    l.layers * per_layer + l.hidden /* final norm */ + l.vocab * l.hidden /* lm_head */ + l.hidden
    /* one embedding row */
}

/// The floor with every weight and the KV cache in `dtype`, at `bandwidth`
/// bytes/s.
pub fn decode_floor(l: &LlmSpec, dtype: DType, bandwidth: f64) -> DecodeFloor {
    let elem = dtype.size_in_bytes();
    let head_dim = l.hidden / l.heads;
    let mean_pos = l.prompt + l.new.div_ceil(2);
    DecodeFloor {
        weight_bytes: decode_weight_elems(l) * elem,
        kv_bytes: 2 * l.layers * l.kv_heads * head_dim * mean_pos * elem,
        bandwidth,
    }
}

/// [`decode_floor`]'s weight bytes with the attention and MLP linears in
/// `q` (as `--quant` loads them: rows that are not whole Q4_K super-blocks
/// in Q8_0), everything else in `dtype`; same KV cache and bandwidth.
pub fn quant_decode_floor(l: &LlmSpec, dtype: DType, q: QuantType, base: DecodeFloor) -> DecodeFloor {
    let elem = dtype.size_in_bytes();
    let kv = l.kv_heads * (l.hidden / l.heads);
    let lq = emu_llm::LlmQuant::new(q);
    let bytes = |out: usize, inner: usize| match lq.format_for("", inner) {
        Ok(f) => out * inner / f.block_size() * f.type_size(),
        Err(_) => out * inner * elem,
    };
    let (h, i) = (l.hidden, l.intermediate);
    let linear_elems = l.layers * (2 * h * h + 2 * h * kv + 3 * h * i);
    let linear_bytes = l.layers * (2 * bytes(h, h) + 2 * bytes(kv, h) + 2 * bytes(i, h) + bytes(h, i));
    DecodeFloor {
        weight_bytes: (decode_weight_elems(l) - linear_elems) * elem + linear_bytes,
        ..base
    }
}

/// Host read bandwidth in bytes/s: a `bytes`-sized buffer split into
/// `threads` contiguous shares, each summed by its own thread, all at
/// once; best of `reps`. The buffer is written before timing so page faults
/// are not timed, and the sums are combined and observed so no read can be
/// dropped. The buffer is on huge pages where the OS gives them, as the
/// CPU backend's weights are (`emu_core::memory::huge_vec`).
pub fn read_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(threads.max(1));
    let mut buf: Vec<u64> = emu_core::memory::huge_vec(words);
    buf.extend((0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    emu_core::memory::settle_on_huge_pages(&buf);
    let share = words.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    let mut total = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let sum = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(share).map(|c| s.spawn(move || sum_words(c))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        best = best.min(t.elapsed().as_secs_f64());
        total = total.wrapping_add(sum);
    }
    std::hint::black_box(total);
    (words * 8) as f64 / best
}

/// Wrapping sum of `w`, through the widest vector loads this CPU has.
fn sum_words(w: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { sum_words_avx512(w) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { sum_words_avx2(w) };
        }
    }
    sum_words_portable(w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(w: &[u64]) -> u64 {
    sum_words_portable(w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(w: &[u64]) -> u64 {
    sum_words_portable(w)
}

/// Sixteen independent accumulators, so the loop is bound by loads, not by
/// the latency of one add chain, and vectorises to full-width loads.
#[inline(always)]
fn sum_words_portable(w: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    let mut chunks = w.chunks_exact(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*x);
        }
    }
    let tail = chunks.remainder().iter().fold(0u64, |a, x| a.wrapping_add(*x));
    acc.iter().fold(tail, |a, x| a.wrapping_add(*x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_count_matches_a_hand_count_and_bandwidth_is_measured() {
        let l = LlmSpec {
            hidden: 8,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            intermediate: 16,
            vocab: 10,
            visual_dim: 4,
            prompt: 3,
            new: 4,
            regress_prompt: 2,
            regress: 2,
        };
        // per layer: q,o 2*64; k,v 2*8*4; mlp 3*8*16; norms 16 -> 128+64+384+16 = 592
        assert_eq!(decode_weight_elems(&l), 2 * 592 + 8 + 80 + 8);
        let bw = read_bandwidth(1 << 20, 2, 2);
        assert!(bw.is_finite() && bw > 0.0);
    }

    #[test]
    fn the_reduction_sums_every_word() {
        let w: Vec<u64> = (1..=1000).collect();
        assert_eq!(sum_words(&w), 500_500);
        assert_eq!(sum_words_portable(&w[..7]), 28);
    }
}
