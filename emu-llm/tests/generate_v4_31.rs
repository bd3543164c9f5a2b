//! `emu_llm::generate` with `TransformersVersion::V4_31` against
//! transformers 4.31.0's `generate(inputs_embeds=...)`, the version upstream
//! Emu2 pins (tests/fixtures/llm431, made by tools/reference/fixtures_llm431.py
//! on the tests/fixtures/llm/mha model): token-for-token equality for greedy
//! and beam search, and evidence that 4.31 and 5.x decode differently.

mod common;

use common::Fixture;
use emu_core::checkpoint::Checkpoint;
use emu_core::DType;
use emu_llm::{generate, GenerationConfig, TransformersVersion};
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm431")
}

/// The llm/mha model with the 4.31 generation cases.
fn load() -> Fixture {
    let mut f = Fixture::load("mha", DType::F32);
    f.cases = Checkpoint::open(fixture_dir().join("cases.safetensors")).unwrap();
    f
}

fn settings() -> Vec<(String, GenerationConfig)> {
    let path = fixture_dir().join("generation.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["transformers"], "4.31.0");
    common::generation_settings(&path)
        .into_iter()
        .map(|(name, cfg)| {
            let cfg = GenerationConfig {
                transformers: TransformersVersion::V4_31,
                ..cfg
            };
            (name, cfg)
        })
        .collect()
}

/// Every (setting, prompt) case: its embeddings key and expected output key.
fn cases(f: &Fixture, name: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0.. {
        let key = format!("gen.embeds.{i}");
        if !f.cases.contains(&key) {
            break;
        }
        out.push((key, format!("gen.{name}.{i}")));
    }
    let pair = format!("gen2.{name}");
    if f.cases.contains(&pair) {
        out.push(("gen2.embeds".into(), pair));
    }
    out
}

#[test]
fn matches_transformers_4_31_token_for_token() {
    let f = load();
    let (mut checked, mut beams, mut eos_hits) = (0, 0, 0);
    for (name, cfg) in settings() {
        for (x, want) in cases(&f, &name) {
            let got = generate(&f.model, &f.tensor(&x), &[], &cfg, None).unwrap();
            let want = f.rows(&want);
            assert_eq!(got, want, "{name} {x}");
            checked += 1;
            beams += (cfg.num_beams > 1) as usize;
            eos_hits += want.iter().any(|r| r.contains(&cfg.eos_token_ids[0])) as usize;
        }
    }
    println!("{checked} generations equal ({beams} beam searches), {eos_hits} hit EOS");
    assert!(checked >= 22 * 8 && beams >= 20 * 8, "{checked} {beams}");
    assert!(eos_hits >= checked / 4, "the fixtures should exercise EOS: {eos_hits}");
}

#[test]
fn transformers_4_31_and_5_decode_differently() {
    // The same settings under 5.x semantics (checked against 5.24 by
    // generate.rs): the option must matter on these fixtures, for beam
    // scoring and for the repetition penalty on the seeded BOS (the
    // `*_rep_bos` settings seed an id that greedy decoding generates).
    let f = load();
    let (mut total, mut differ, mut bos_differ) = (0, 0, 0);
    for (name, cfg) in settings() {
        let v5 = GenerationConfig {
            transformers: TransformersVersion::V5,
            ..cfg.clone()
        };
        for (x, want) in cases(&f, &name) {
            let got = generate(&f.model, &f.tensor(&x), &[], &v5, None).unwrap();
            total += 1;
            if got != f.rows(&want) {
                differ += 1;
                if name.ends_with("_rep_bos") {
                    bos_differ += 1;
                } else {
                    assert!(cfg.num_beams > 1, "{name} {x}: greedy should not depend on the version");
                }
                println!("{name} {x}: 4.31 {:?}, 5.x {got:?}", f.rows(&want));
            }
        }
    }
    println!(
        "{differ} of {total} generations differ between transformers 4.31 and 5.x \
         ({bos_differ} through the BOS under the repetition penalty)"
    );
    assert!(differ > bos_differ, "no beam setting tells 4.31 from 5.x");
    assert!(bos_differ > 0, "no setting shows the BOS under the repetition penalty");
}

#[test]
fn left_padded_batch_matches_transformers_4_31() {
    let f = load();
    let mask = f.rows("gen3.mask");
    let padding: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m == 0).count()).collect();
    let mut checked = 0;
    for (name, cfg) in settings() {
        let key = format!("gen3.{name}");
        if f.cases.contains(&key) {
            let got = generate(&f.model, &f.tensor("gen3.embeds"), &padding, &cfg, None).unwrap();
            assert_eq!(got, f.rows(&key), "{name} padded batch");
            checked += 1;
        }
    }
    assert_eq!(checked, 5);
}

/// Sequences end at their first token that is a multiple of three.
fn stops_at_threes(ids: &[u32]) -> bool {
    ids.last().is_some_and(|t| t % 3 == 0)
}

#[test]
fn stop_rules_end_4_31_beams() {
    // 4.31 has no per-sequence stop rules; here a candidate that meets one
    // finishes like an EOS one (keeping its token). This rule ends about a
    // third of all candidates, so some steps need more than the top
    // 2 * num_beams candidates to keep num_beams beams running.
    let f = load();
    let (_, base) = settings().into_iter().find(|(n, _)| n == "beam5_lp0_n16").unwrap();
    let mut stopped = 0;
    for lp in [-1.0, 0.0, 2.0] {
        let cfg = GenerationConfig {
            length_penalty: lp,
            ..base.clone()
        };
        for (x, _) in cases(&f, "beam5_lp0_n16") {
            let mut rule = stops_at_threes;
            let hooks = emu_llm::Hooks {
                stop: Some(&mut rule),
                ..Default::default()
            };
            let got = emu_llm::generate_with(&f.model, &f.tensor(&x), &[], &cfg, hooks).unwrap();
            for row in got {
                let end = row
                    .iter()
                    .position(|t| cfg.eos_token_ids.contains(t))
                    .map_or(row.len(), |i| i + 1);
                let body = &row[..end];
                // Nothing continues past a stopping token.
                for (i, t) in body.iter().enumerate() {
                    assert!(t % 3 != 0 || i + 1 == body.len(), "lp {lp} {x}: {row:?}");
                }
                stopped += body.last().is_some_and(|t| t % 3 == 0) as usize;
            }
        }
    }
    assert!(stopped > 0, "the rule should end some answers");
}
