//! The decoder against transformers' LlamaForCausalLM (tests/fixtures/llm):
//! slot filling, prefill, cached decode steps and left-padded batches, in f32
//! and bf16, for an MHA and a GQA config.

mod common;

use common::{check, Fixture, SLOTS};
use emu_core::{DType, Tensor};
use emu_llm::{Error, Logits};

const SETS: [&str; 2] = ["mha", "gqa"];

fn prefill_and_decode(set: &str, dtype: DType) {
    let f = Fixture::load(set, dtype);
    let m = &f.model;
    let ids = f.ids("slots.ids");
    let image = f.tensor("slots.image");
    let video = f.tensor("slots.video");
    let embeds = m.embed_with_visual(&ids, 1, Some(&image), Some(&video), SLOTS).unwrap();
    check(
        &format!("{set} slot-filled embeddings"),
        &embeds.to_f32_vec().unwrap(),
        &f.f32s("prefill.embeds"),
        dtype,
    );
    let mut cache = m.new_cache(1, 40).unwrap();
    let out = m.forward_embeds(&embeds, &mut cache, Logits::All).unwrap();
    check(
        &format!("{set} prefill hidden"),
        &out.hidden.to_f32_vec().unwrap(),
        &f.expected("prefill.hidden"),
        dtype,
    );
    check(
        &format!("{set} prefill logits"),
        &out.logits.unwrap().to_f32_vec().unwrap(),
        &f.expected("prefill.logits"),
        dtype,
    );
    let steps = f.tensor("decode.embeds");
    let n = steps.dim(1).unwrap();
    let (mut hs, mut ls) = (Vec::new(), Vec::new());
    for s in 0..n {
        let o = m
            .forward_embeds(&steps.narrow(1, s, 1).unwrap(), &mut cache, Logits::Last)
            .unwrap();
        hs.push(o.hidden);
        ls.push(o.logits.unwrap());
    }
    let cat = |v: &[Tensor<_>]| {
        let r: Vec<&Tensor<_>> = v.iter().collect();
        Tensor::concat(&r, 1).unwrap().to_f32_vec().unwrap()
    };
    check(
        &format!("{set} decode hidden"),
        &cat(&hs),
        &f.expected("decode.hidden"),
        dtype,
    );
    check(
        &format!("{set} decode logits"),
        &cat(&ls),
        &f.expected("decode.logits"),
        dtype,
    );
    assert_eq!(cache.len(), ids.len() + n);
}

/// Values of `[B, T, W]` at the positions where `mask` is 1.
fn unpadded(v: &[f32], mask: &[u32], width: usize) -> Vec<f32> {
    mask.iter()
        .enumerate()
        .filter(|(_, &m)| m == 1)
        .flat_map(|(i, _)| v[i * width..(i + 1) * width].iter().copied())
        .collect()
}

fn left_padded_batch(set: &str, dtype: DType) {
    let f = Fixture::load(set, dtype);
    let m = &f.model;
    let mask = f.ids("batch.mask");
    let dims = f.host("batch.mask").dims().to_vec();
    let (b, t) = (dims[0], dims[1]);
    let pads: Vec<usize> = (0..b)
        .map(|r| mask[r * t..(r + 1) * t].iter().filter(|&&x| x == 0).count())
        .collect();
    let mut cache = m.new_cache_padded(&pads, 16).unwrap();
    let out = m
        .forward_embeds(&f.tensor("batch.embeds"), &mut cache, Logits::All)
        .unwrap();
    let (h, v) = (m.config().hidden_size, m.config().vocab_size);
    check(
        &format!("{set} padded hidden"),
        &unpadded(&out.hidden.to_f32_vec().unwrap(), &mask, h),
        &unpadded(&f.expected("batch.hidden"), &mask, h),
        dtype,
    );
    check(
        &format!("{set} padded logits"),
        &unpadded(&out.logits.unwrap().to_f32_vec().unwrap(), &mask, v),
        &unpadded(&f.expected("batch.logits"), &mask, v),
        dtype,
    );
    let steps = f.tensor("batch.step_embeds");
    let n = steps.dim(1).unwrap();
    let mut got = vec![Vec::new(); b];
    for s in 0..n {
        let o = m
            .forward_embeds(&steps.narrow(1, s, 1).unwrap(), &mut cache, Logits::Last)
            .unwrap();
        let l = o.logits.unwrap().to_f32_vec().unwrap();
        for (r, g) in got.iter_mut().enumerate() {
            g.extend_from_slice(&l[r * v..(r + 1) * v]);
        }
    }
    check(
        &format!("{set} padded decode logits"),
        &got.concat(),
        &f.expected("batch.step_logits"),
        dtype,
    );
}

#[test]
fn prefill_and_decode_f32() {
    for set in SETS {
        prefill_and_decode(set, DType::F32);
    }
}

#[test]
fn prefill_and_decode_bf16() {
    for set in SETS {
        prefill_and_decode(set, DType::BF16);
    }
}

#[test]
fn left_padded_batch_f32() {
    for set in SETS {
        left_padded_batch(set, DType::F32);
    }
}

#[test]
fn left_padded_batch_bf16() {
    for set in SETS {
        left_padded_batch(set, DType::BF16);
    }
}

#[test]
fn slot_count_mismatch_names_both_counts() {
    let f = Fixture::load("mha", DType::F32);
    let ids = f.ids("slots.ids");
    let image = f.tensor("slots.image");
    let short = image.narrow(0, 0, image.dim(0).unwrap() - 1).unwrap();
    let video = f.tensor("slots.video");
    let e = f
        .model
        .embed_with_visual(&ids, 1, Some(&short), Some(&video), SLOTS)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::SlotCount {
                slots: 7,
                given: 6,
                token_id: 390,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains('7') && msg.contains('6'), "{msg}");
    let e = f
        .model
        .embed_with_visual(&ids, 1, Some(&image), None, SLOTS)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::SlotCount {
                what: "video",
                slots: 2,
                given: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn context_overflow_is_an_error() {
    let f = Fixture::load("mha", DType::F32);
    let m = &f.model;
    let mut cache = m.new_cache(1, 8).unwrap();
    let x = f.tensor("prefill.embeds");
    let e = m.forward_embeds(&x, &mut cache, Logits::Skip).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ContextOverflow {
                needed: 21,
                capacity: 8
            }
        ),
        "{e}"
    );
    let x8 = x.narrow(1, 0, 8).unwrap();
    m.forward_embeds(&x8, &mut cache, Logits::Skip).unwrap();
    let e = m
        .forward_embeds(&x.narrow(1, 0, 1).unwrap(), &mut cache, Logits::Skip)
        .unwrap_err();
    assert!(matches!(e, Error::ContextOverflow { needed: 9, .. }), "{e}");
    let e = m.new_cache(1, 129).unwrap_err();
    assert!(matches!(e, Error::ContextOverflow { .. }), "{e}");
}

#[test]
fn token_ids_outside_the_vocabulary_are_rejected() {
    let f = Fixture::load("gqa", DType::F32);
    let e = f.model.embed(&[1, 2, 400], 1).unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");
}

/// `forward_rows` gives every row, bit for bit, what `forward_embeds` gives
/// its sequence alone: caches of different lengths and capacities, several
/// steps, in f32 and bf16.
fn rows_match_alone(set: &str, dtype: DType) {
    let f = Fixture::load(set, dtype);
    let m = &f.model;
    let prompts = ["gen.embeds.3", "gen.embeds.0", "gen.embeds.2"];
    let capacities = [20, 31, 12];
    let mut alone = Vec::new();
    let mut rows = Vec::new();
    for (key, &cap) in prompts.iter().zip(&capacities) {
        let x = f.tensor(key);
        for caches in [&mut alone, &mut rows] {
            let mut c = m.new_cache(1, cap).unwrap();
            m.forward_embeds(&x, &mut c, Logits::Last).unwrap();
            caches.push(c);
        }
    }
    for step in 0..4u32 {
        let tokens: Vec<u32> = (0..prompts.len() as u32).map(|r| 3 + 7 * r + step).collect();
        let mut want = Vec::new();
        for (c, &t) in alone.iter_mut().zip(&tokens) {
            let e = m.embed(&[t], 1).unwrap();
            let o = m.forward_embeds(&e, c, Logits::Last).unwrap();
            want.extend(o.logits.unwrap().to_f32_vec().unwrap());
        }
        let e = m.embed(&tokens, tokens.len()).unwrap();
        let mut refs: Vec<&mut emu_llm::KvCache<_>> = rows.iter_mut().collect();
        let got = m.forward_rows(&e, &mut refs, Logits::Last).unwrap();
        let got = got.logits.unwrap().to_f32_vec().unwrap();
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{set} {dtype:?} step {step}: rows differ from their sequences alone"
        );
        assert_eq!(got.len(), want.len());
    }
    for (a, r) in alone.iter().zip(&rows) {
        assert_eq!(a.len(), r.len());
    }
}

#[test]
fn forward_rows_match_each_sequence_alone() {
    for set in SETS {
        rows_match_alone(set, DType::F32);
        rows_match_alone(set, DType::BF16);
    }
}

#[test]
fn forward_rows_checks_its_caches() {
    let f = Fixture::load("mha", DType::F32);
    let m = &f.model;
    let e = m.embed(&[1, 2], 2).unwrap();
    let mut one = m.new_cache(1, 4).unwrap();
    let mut refs = vec![&mut one];
    assert!(matches!(
        m.forward_rows(&e, &mut refs, Logits::Last),
        Err(Error::Input(_))
    ));
    let mut pair = m.new_cache(2, 4).unwrap();
    let mut full = m.new_cache(1, 1).unwrap();
    m.forward_embeds(&m.embed(&[1], 1).unwrap(), &mut full, Logits::Skip)
        .unwrap();
    let mut refs = vec![&mut pair];
    let e1 = m.embed(&[1], 1).unwrap();
    assert!(matches!(
        m.forward_rows(&e1, &mut refs, Logits::Last),
        Err(Error::Input(_))
    ));
    let mut refs = vec![&mut full];
    assert!(matches!(
        m.forward_rows(&e1, &mut refs, Logits::Last),
        Err(Error::ContextOverflow { .. })
    ));
}
