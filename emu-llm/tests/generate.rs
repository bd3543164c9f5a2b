//! `emu_llm::generate` against transformers' `generate(inputs_embeds=...)`
//! (tests/fixtures/llm/*/generation.json holds the settings): token-for-token
//! equality for greedy and beam search, plus properties of sampling.

mod common;

use common::Fixture;
use emu_core::DType;
use emu_llm::{generate, generate_batch, generate_with, BatchRow, Error, GenerationConfig, Hooks, StopStrings};

const SETS: [&str; 2] = ["mha", "gqa"];

fn settings(set: &str) -> Vec<(String, GenerationConfig)> {
    common::generation_settings(&common::fixture_dir(set).join("generation.json"))
}

#[test]
fn matches_transformers_generate_token_for_token() {
    let mut checked = 0;
    let mut eos_hits = 0;
    for set in SETS {
        let f = Fixture::load(set, DType::F32);
        for (name, cfg) in settings(set) {
            for i in 0.. {
                let key = format!("gen.embeds.{i}");
                if !f.cases.contains(&key) {
                    break;
                }
                let got = generate(&f.model, &f.tensor(&key), &[], &cfg, None).unwrap();
                let want = f.rows(&format!("gen.{name}.{i}"));
                assert_eq!(got, want, "{set} {name} prompt {i}");
                checked += 1;
                eos_hits += want[0].contains(&cfg.eos_token_ids[0]) as usize;
            }
            let key = format!("gen2.{name}");
            if f.cases.contains(&key) {
                let got = generate(&f.model, &f.tensor("gen2.embeds"), &[], &cfg, None).unwrap();
                assert_eq!(got, f.rows(&key), "{set} {name} batch of two");
                checked += 1;
            }
        }
    }
    println!("{checked} generations equal, {eos_hits} of them ended with EOS");
    assert!(checked >= 2 * 7 * 6);
    assert!(eos_hits > 0, "the fixtures should exercise EOS");
}

fn sampling(seed: u64, top_k: usize, top_p: f32, temperature: f32) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 10,
        do_sample: true,
        top_k,
        top_p,
        temperature,
        seed,
        ..Default::default()
    }
}

#[test]
fn sampling_is_seeded_and_filtered() {
    let f = Fixture::load("mha", DType::F32);
    let x = f.tensor("gen.embeds.1");
    let greedy = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let g = generate(&f.model, &x, &[], &greedy, None).unwrap();
    // top_k = 1 (and a vanishing nucleus) leaves only the argmax to sample.
    for cfg in [sampling(3, 1, 1.0, 0.7), sampling(4, 0, 1e-6, 1.3)] {
        assert_eq!(generate(&f.model, &x, &[], &cfg, None).unwrap(), g);
    }
    let a = generate(&f.model, &x, &[], &sampling(5, 50, 0.95, 1.5), None).unwrap();
    let b = generate(&f.model, &x, &[], &sampling(5, 50, 0.95, 1.5), None).unwrap();
    assert_eq!(a, b, "same seed, same sample");
    let outs: Vec<_> = (0..6)
        .map(|s| generate(&f.model, &x, &[], &sampling(s, 0, 1.0, 2.0), None).unwrap())
        .collect();
    assert!(
        outs.iter().any(|o| o != &outs[0]),
        "different seeds at temperature 2 should differ"
    );
}

#[test]
fn streaming_reports_every_token() {
    let f = Fixture::load("gqa", DType::F32);
    let x = f.tensor("gen.embeds.0");
    let (_, cfg) = settings("gqa").into_iter().find(|(n, _)| n == "greedy").unwrap();
    let mut seen = Vec::new();
    let mut cb = |t: &[u32]| seen.push(t[0]);
    let out = generate(&f.model, &x, &[], &cfg, Some(&mut cb)).unwrap();
    assert_eq!(vec![seen], out);
    let beam = GenerationConfig { num_beams: 2, ..cfg };
    let mut cb = |_: &[u32]| {};
    let e = generate(&f.model, &x, &[], &beam, Some(&mut cb)).unwrap_err();
    assert!(matches!(e, Error::Generation(_)), "{e}");
}

#[test]
fn left_padded_batch_matches_transformers() {
    let mut checked = 0;
    for set in SETS {
        let f = Fixture::load(set, DType::F32);
        let mask = f.rows("gen3.mask");
        let padding: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m == 0).count()).collect();
        for (name, cfg) in settings(set) {
            let key = format!("gen3.{name}");
            if !f.cases.contains(&key) {
                continue;
            }
            let got = generate(&f.model, &f.tensor("gen3.embeds"), &padding, &cfg, None).unwrap();
            assert_eq!(got, f.rows(&key), "{set} {name} padded batch");
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn left_padded_batch_matches_single_prompts() {
    // A padded batch must generate what each prompt generates alone.
    let f = Fixture::load("mha", DType::F32);
    let (_, cfg) = settings("mha").into_iter().find(|(n, _)| n == "beam5_lp2").unwrap();
    let a = f.tensor("gen.embeds.3"); // 11 positions
    let b = f.tensor("gen.embeds.2"); // 3 positions
    let pad = emu_core::Tensor::zeros(&f.backend, &[1, 8, 64], DType::F32).unwrap();
    let b_padded = emu_core::Tensor::concat(&[&pad, &b], 1).unwrap();
    let batch = emu_core::Tensor::concat(&[&a, &b_padded], 0).unwrap();
    for cfg in [cfg.clone(), GenerationConfig { num_beams: 1, ..cfg }] {
        let got = generate(&f.model, &batch, &[0, 8], &cfg, None).unwrap();
        let one = |x| generate(&f.model, x, &[], &cfg, None).unwrap().remove(0);
        let (ra, rb) = (one(&a), one(&b));
        // Up to and including the first EOS: the fill after it depends on the batch.
        let strip = |v: Vec<u32>| -> Vec<u32> {
            match v.iter().position(|t| cfg.eos_token_ids.contains(t)) {
                Some(i) => v[..=i].to_vec(),
                None => v,
            }
        };
        assert_eq!(strip(got[0].clone()), strip(ra), "{cfg:?}");
        assert_eq!(strip(got[1].clone()), strip(rb), "{cfg:?}");
    }
}

type Sink<'a> = Box<dyn FnMut(&[u32]) + 'a>;

#[test]
fn a_lockstep_batch_matches_each_prompt_alone() {
    // Different prompt lengths, greedy and seeded sampling with their own
    // temperatures and lengths, a stop string, and an EOS: every row must
    // produce, and stream, exactly what its prompt produces alone.
    for set in SETS {
        let f = Fixture::load(set, DType::F32);
        let (_, greedy) = settings(set).into_iter().find(|(n, _)| n == "greedy").unwrap();
        let alone_ids = generate(&f.model, &f.tensor("gen.embeds.1"), &[], &greedy, None).unwrap();
        let stop = straddling(&alone_ids[0], 3);
        let rows: Vec<(String, GenerationConfig)> = vec![
            ("gen.embeds.3".into(), greedy.clone()),
            ("gen.embeds.2".into(), sampling(11, 50, 0.9, 1.3)),
            (
                "gen.embeds.1".into(),
                GenerationConfig {
                    stop_strings: vec![stop.clone()],
                    ..greedy.clone()
                },
            ),
            (
                "gen.embeds.0".into(),
                GenerationConfig {
                    max_new_tokens: 3,
                    ..sampling(12, 0, 1.0, 0.8)
                },
            ),
            ("gen.embeds.2".into(), greedy.clone()),
        ];
        let alone: Vec<(Vec<u32>, Vec<u32>)> = rows
            .iter()
            .map(|(key, cfg)| {
                let mut streamed = Vec::new();
                let mut on = |t: &[u32]| streamed.extend_from_slice(t);
                let hooks = Hooks {
                    on_token: Some(&mut on),
                    decode: Some(&angle),
                    ..Hooks::default()
                };
                let ids = generate_with(&f.model, &f.tensor(key), &[], cfg, hooks)
                    .unwrap()
                    .remove(0);
                (ids, streamed)
            })
            .collect();
        let mut streams: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
        let mut sinks: Vec<Sink<'_>> = streams
            .iter_mut()
            .map(|s| Box::new(move |t: &[u32]| s.extend_from_slice(t)) as Sink<'_>)
            .collect();
        let batch: Vec<BatchRow<'_, _>> = rows
            .iter()
            .zip(sinks.iter_mut())
            .map(|((key, cfg), sink)| BatchRow {
                embeds: f.tensor(key),
                cfg: cfg.clone(),
                hooks: Hooks {
                    on_token: Some(&mut **sink),
                    decode: Some(&angle),
                    ..Hooks::default()
                },
            })
            .collect();
        let got = generate_batch(&f.model, batch);
        drop(sinks);
        let lengths: Vec<usize> = alone.iter().map(|(ids, _)| ids.len()).collect();
        assert!(
            lengths.iter().any(|&n| n < greedy.max_new_tokens),
            "{set}: some row should stop early: {lengths:?}"
        );
        assert!(
            alone[2].0.len() <= 4,
            "{set}: the stop string ends row 2 by its 4th token"
        );
        for (i, ((want, want_stream), got)) in alone.iter().zip(got).enumerate() {
            assert_eq!(&got.unwrap(), want, "{set} row {i}");
            assert_eq!(&streams[i], want_stream, "{set} row {i} streamed");
        }
    }
}

#[test]
fn a_batch_row_with_bad_settings_fails_alone() {
    let f = Fixture::load("mha", DType::F32);
    let ok = GenerationConfig {
        max_new_tokens: 4,
        ..Default::default()
    };
    let rows = vec![
        BatchRow {
            embeds: f.tensor("gen.embeds.0"),
            cfg: GenerationConfig {
                num_beams: 2,
                ..ok.clone()
            },
            hooks: Hooks::default(),
        },
        BatchRow {
            embeds: f.tensor("gen.embeds.1"),
            cfg: ok.clone(),
            hooks: Hooks::default(),
        },
        BatchRow {
            embeds: f.tensor("gen.embeds.1"),
            cfg: GenerationConfig {
                max_new_tokens: 10_000,
                ..ok.clone()
            },
            hooks: Hooks::default(),
        },
    ];
    let got = generate_batch(&f.model, rows);
    assert!(matches!(got[0], Err(Error::Generation(_))), "{:?}", got[0]);
    let alone = generate(&f.model, &f.tensor("gen.embeds.1"), &[], &ok, None).unwrap();
    assert_eq!(got[1].as_ref().unwrap(), &alone[0]);
    assert!(matches!(got[2], Err(Error::ContextOverflow { .. })), "{:?}", got[2]);
}

#[test]
fn invalid_settings_are_rejected() {
    let f = Fixture::load("mha", DType::F32);
    let x = f.tensor("gen.embeds.0");
    for cfg in [
        GenerationConfig {
            max_new_tokens: 0,
            ..Default::default()
        },
        GenerationConfig {
            num_beams: 3,
            do_sample: true,
            ..Default::default()
        },
        sampling(0, 0, 0.0, 1.0),
        sampling(0, 0, 1.0, 0.0),
    ] {
        let e = generate(&f.model, &x, &[], &cfg, None).unwrap_err();
        assert!(matches!(e, Error::Generation(_)), "{e}");
    }
    let too_long = GenerationConfig {
        max_new_tokens: 200,
        ..Default::default()
    };
    let e = generate(&f.model, &x, &[], &too_long, None).unwrap_err();
    assert!(matches!(e, Error::ContextOverflow { .. }), "{e}");
}

/// Token `i` decodes as `<i>`: stop strings can then span and cut tokens.
fn angle(ids: &[u32]) -> String {
    ids.iter().map(|i| format!("<{i}>")).collect()
}

/// The length of the shortest prefix of `ids` whose text contains `s`.
fn first_completion(ids: &[u32], s: &str) -> Option<usize> {
    (1..=ids.len()).find(|&n| angle(&ids[..n]).contains(s))
}

/// A stop string cut out of `ids[i-1..=i]`'s text that starts and ends inside tokens.
fn straddling(ids: &[u32], i: usize) -> String {
    let t = angle(&ids[i - 1..=i]);
    t[2..t.len() - 1].to_string()
}

fn with_stops(f: &Fixture, x: &emu_core::Tensor<emu_backend_cpu::CpuBackend>, cfg: &GenerationConfig) -> Vec<Vec<u32>> {
    let hooks = Hooks {
        decode: Some(&angle),
        ..Hooks::default()
    };
    generate_with(&f.model, x, &[], cfg, hooks).unwrap()
}

#[test]
fn stop_strings_end_greedy_and_sampled_sequences() {
    let f = Fixture::load("mha", DType::F32);
    let x = f.tensor("gen.embeds.1");
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    for cfg in [greedy, sampling(5, 50, 0.95, 1.5)] {
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            ..cfg
        };
        let free = generate(&f.model, &x, &[], &cfg, None).unwrap().remove(0);
        assert_eq!(free.len(), 12);
        for i in [1, 4, 9] {
            let s = straddling(&free, i);
            let n = first_completion(&free, &s).unwrap();
            let stopped = GenerationConfig {
                stop_strings: vec!["never generated".into(), s.clone()],
                ..cfg.clone()
            };
            let got = with_stops(&f, &x, &stopped).remove(0);
            assert_eq!(got, free[..n].to_vec(), "stop {s:?} in {}", angle(&free));
        }
    }
}

#[test]
fn stop_strings_end_beams() {
    let f = Fixture::load("mha", DType::F32);
    let x = f.tensor("gen.embeds.1");
    for lp in [-1.0, 2.0] {
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            num_beams: 5,
            length_penalty: lp,
            ..Default::default()
        };
        let free = generate(&f.model, &x, &[], &cfg, None).unwrap().remove(0);
        let s = straddling(&free, 3);
        let stopped = GenerationConfig {
            stop_strings: vec![s.clone()],
            ..cfg.clone()
        };
        let got = with_stops(&f, &x, &stopped).remove(0);
        // Every beam ends at the token that completes the stop string: the
        // best hypothesis holds it exactly once, at its end, or never.
        match first_completion(&got, &s) {
            Some(n) => assert_eq!(n, got.len(), "lp {lp}: {} continues past {s:?}", angle(&got)),
            None => assert_eq!(got.len(), 12, "lp {lp}: {}", angle(&got)),
        }
        assert_ne!(got, free, "lp {lp}: the stop string changed nothing");
        // The same rule given as a plain stopping check gives the same beams.
        let mut rule = |ids: &[u32]| StopStrings::new(std::slice::from_ref(&s), &angle).matches(ids);
        let hooks = Hooks {
            stop: Some(&mut rule),
            ..Hooks::default()
        };
        assert_eq!(generate_with(&f.model, &x, &[], &cfg, hooks).unwrap().remove(0), got);
    }
}

#[test]
fn stop_strings_need_a_decoder() {
    let f = Fixture::load("mha", DType::F32);
    let x = f.tensor("gen.embeds.0");
    let cfg = GenerationConfig {
        stop_strings: vec!["x".into()],
        ..Default::default()
    };
    let e = generate(&f.model, &x, &[], &cfg, None).unwrap_err();
    assert!(
        matches!(e, Error::Generation(_)) && e.to_string().contains("decoder"),
        "{e}"
    );
    let empty = GenerationConfig {
        stop_strings: vec![String::new()],
        ..Default::default()
    };
    let hooks = Hooks {
        decode: Some(&angle),
        ..Hooks::default()
    };
    let e = generate_with(&f.model, &x, &[], &empty, hooks).unwrap_err();
    assert!(matches!(e, Error::Generation(_)), "{e}");
}
