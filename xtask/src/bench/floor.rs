//! The memory-bandwidth floor of LLM decode: decoding one token must read
//! every weight but the embedding table (of which one row), plus the K/V
//! cache up to the current position, so no implementation can decode faster
//! than those bytes divided by the machine's memory bandwidth. A decode time
//! close to the floor means the kernels are not what limits it.

use super::models::LlmSpec;
use emu_core::DType;
use std::time::Instant;

/// What decode must read per token, and how fast this machine reads.
#[derive(Debug, Clone, Copy)]
pub struct DecodeFloor {
    pub weight_bytes: usize,
    /// K and V of every layer at the mean position of the timed decode steps.
    pub kv_bytes: usize,
    /// Host copy bandwidth in bytes/s, counted as STREAM counts Copy (bytes
    /// read plus bytes written).
    pub bandwidth: f64,
}

impl DecodeFloor {
    pub fn ms_per_token(&self) -> f64 {
        (self.weight_bytes + self.kv_bytes) as f64 / self.bandwidth * 1e3
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

/// `copy_bytes`: the buffer the bandwidth is measured on; it must be well
/// past the last-level cache for the number to mean DRAM.
pub fn decode_floor(l: &LlmSpec, dtype: DType, threads: usize, copy_bytes: usize) -> DecodeFloor {
    let elem = dtype.size_in_bytes();
    let head_dim = l.hidden / l.heads;
    let mean_pos = l.prompt + l.new.div_ceil(2);
    DecodeFloor {
        weight_bytes: decode_weight_elems(l) * elem,
        kv_bytes: 2 * l.layers * l.kv_heads * head_dim * mean_pos * elem,
        bandwidth: copy_bandwidth(copy_bytes, threads, 5),
    }
}

/// Host copy bandwidth in bytes/s (read + written): a `bytes`-sized buffer
/// copied in `threads` chunks at once, best of `reps`; both buffers are
/// touched first so page faults are not timed.
pub fn copy_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![1u8; bytes];
    let chunk = bytes.div_ceil(threads.max(1)).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    // Keeps the copy observable so it cannot be elided.
    assert_eq!(dst[bytes / 2], src[bytes / 2]);
    2.0 * bytes as f64 / best
}

/// [`decode_floor`]'s weight bytes with the attention and MLP linears in
/// `q` (as `--quant` loads them: rows that are not whole Q4_K super-blocks
/// in Q8_0), everything else in `dtype`; same KV cache and bandwidth.
pub fn quant_decode_floor(l: &LlmSpec, dtype: DType, q: emu_core::QuantType, base: DecodeFloor) -> DecodeFloor {
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
        let bw = copy_bandwidth(1 << 20, 2, 2);
        assert!(bw.is_finite() && bw > 0.0);
    }
}
