//! The library pipelines on the built-in tiny model (random weights: only
//! shapes, determinism, streaming and option handling are checked, never the
//! words or the picture). The `emu` binary's runs of the same pipelines are
//! tested in emu-cli.

use emu::pipeline::{
    ChatOptions, ChatPipeline, Component, GenerationOptions, GenerationPipeline, ModelDir, ModelFamily, Timings,
};
use emu_backend_cpu::CpuBackend;
use emu_core::{DType, HostTensor};
use emu_prompt::{Item, Prompt, Role, Turn};
use std::path::{Path, PathBuf};

/// A small RGB test picture (a gradient) written as PNG.
fn picture(dir: &Path, name: &str, w: u32, h: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    });
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

#[test]
fn chat_pipeline_library_multi_turn() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 24, 24);
    let model = ModelDir::resolve("tiny", ModelFamily::Emu2Chat).unwrap();
    assert!(model.is_tiny());
    let cpu = Component::new(CpuBackend::new(), DType::F32);
    let chat = ChatPipeline::load(&model, &cpu, &cpu).unwrap();
    let mut opts = ChatOptions::default();
    opts.generation.max_new_tokens = 6;
    let first = Prompt::new(vec![
        Item::Image(img.to_str().unwrap().into()),
        Item::Text("what is this?".into()),
    ]);
    let a1 = chat.answer(&first, &opts, None).unwrap();
    assert!(!a1.ids.is_empty() && a1.ids.len() <= 6);
    assert_eq!(chat.model().tokenizer.decode(&a1.ids, true).unwrap(), a1.text);
    // Image of 16 slots + [IMG] + [/IMG] are part of the prompt.
    assert!(a1.prompt_tokens > 18);
    let mut turns = first.turns.clone();
    turns.push(Turn {
        role: Role::Assistant,
        items: vec![Item::Text(a1.text.clone())],
    });
    turns.push(Turn {
        role: Role::User,
        items: vec![Item::Text("and then?".into())],
    });
    let a2 = chat.answer(&Prompt { turns }, &opts, None).unwrap();
    assert!(a2.prompt_tokens > a1.prompt_tokens + a1.ids.len());

    // Streaming (greedy) delivers exactly the final text.
    opts.generation.num_beams = 1;
    let mut streamed = String::new();
    let mut sink = |s: &str| streamed.push_str(s);
    let a3 = chat.answer(&first, &opts, Some(&mut sink)).unwrap();
    assert_eq!(streamed, a3.text);

    // Two models built independently are identical (fixed seed).
    let again = ModelDir::resolve("tiny", ModelFamily::Emu2Chat).unwrap();
    let chat2 = ChatPipeline::load(&again, &cpu, &cpu).unwrap();
    assert_eq!(chat2.answer(&first, &opts, None).unwrap().ids, a3.ids);
}

#[test]
fn generation_pipeline_library() {
    let model = ModelDir::resolve("tiny", ModelFamily::Emu2Gen).unwrap();
    let cpu = Component::new(CpuBackend::new(), DType::F32);
    let pipe = GenerationPipeline::load(&model, &cpu, &cpu, &cpu).unwrap();
    assert_eq!(pipe.default_size(), 32);
    let prompt = Prompt::new(vec![Item::Text("a red cube".into())]);
    // The 4 regressed embeddings of EVA width 16 (64 x 1792 upstream).
    let cond = pipe.condition(&prompt, &mut Timings::default()).unwrap();
    assert_eq!(cond.dims(), vec![1, 4, 16]);

    let latents = HostTensor::from_f32(&[1, 4, 16, 16], emu::pipeline::gaussian_noise(3, 1024)).unwrap();
    let opts = GenerationOptions {
        steps: 3,
        latents: Some(latents),
        ..GenerationOptions::default()
    };
    let a = pipe.generate(&prompt, &opts, None).unwrap();
    assert_eq!((a.width, a.height, a.rgb.len()), (32, 32, 32 * 32 * 3));
    assert_eq!(a.latents.dims(), &[1, 4, 16, 16]);
    assert_eq!(a.condition.dims(), &[1, 4, 16]);
    // Given latents equal to the seeded noise reproduce the seeded run.
    let seeded = GenerationOptions {
        steps: 3,
        seed: 3,
        ..GenerationOptions::default()
    };
    let mut steps = Vec::new();
    let mut on_step = |k: usize, n: usize| steps.push((k, n));
    let b = pipe.generate(&prompt, &seeded, Some(&mut on_step)).unwrap();
    assert_eq!(a.rgb, b.rgb);
    assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);
    // Guidance changes the result; without it the negative is not used.
    let unguided = GenerationOptions {
        guidance: 1.0,
        ..seeded.clone()
    };
    let c = pipe.generate(&prompt, &unguided, None).unwrap();
    assert_ne!(a.latents.as_bytes(), c.latents.as_bytes());
    // Wrongly shaped latents are refused.
    let bad = GenerationOptions {
        latents: Some(HostTensor::zeros(&[1, 4, 8, 8], DType::F32).unwrap()),
        ..seeded
    };
    assert!(pipe.generate(&prompt, &bad, None).is_err());
}

/// `Residency::Sequential` loads each component for its stage only; batched
/// answers (the server's path: beam requests alone, the others together)
/// are the ones of a resident pipeline, and nothing stays loaded.
#[test]
fn sequential_residency_answers_batches_as_resident() {
    use emu::pipeline::{BatchItem, Residency};
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 24, 24);
    let model = ModelDir::resolve("tiny", ModelFamily::Emu2Chat).unwrap();
    let cpu = Component::new(CpuBackend::new(), DType::F32);
    let all = ChatPipeline::load(&model, &cpu, &cpu).unwrap();
    let seq = ChatPipeline::load_with_residency(&model, &cpu, &cpu, Residency::Sequential).unwrap();
    assert_eq!(seq.model().residency(), Residency::Sequential);
    assert!(seq.model().vision().is_none() && seq.model().llm().is_none());
    assert!(all.model().vision().is_some() && all.model().llm().is_some());
    let with_image = Prompt::new(vec![
        Item::Image(img.to_str().unwrap().into()),
        Item::Text("what is this?".into()),
    ]);
    let text_only = Prompt::new(vec![Item::Text("hello".into())]);
    let mut greedy = ChatOptions::default();
    greedy.generation.max_new_tokens = 5;
    greedy.generation.num_beams = 1;
    let mut beams = greedy.clone();
    beams.generation.num_beams = 2;
    let never = || false;
    let items = || {
        vec![(&with_image, &greedy), (&text_only, &greedy), (&with_image, &beams)]
            .into_iter()
            .map(|(prompt, opts)| BatchItem {
                prompt,
                opts,
                on_text: None,
                cancel: &never,
            })
            .collect::<Vec<_>>()
    };
    let a: Vec<_> = all.answer_batch(items()).into_iter().map(|r| r.unwrap()).collect();
    let b: Vec<_> = seq.answer_batch(items()).into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.ids, &x.text), (&y.ids, &y.text));
    }
    // Each run shows its loads; the resident pipeline's show none.
    let stages = |t: &Timings| t.stages().iter().map(|(n, _)| *n).collect::<Vec<_>>();
    assert!(stages(&b[0].timings).contains(&"load vision"), "{:?}", b[0].timings);
    assert!(stages(&b[2].timings).contains(&"load llm"), "{:?}", b[2].timings);
    assert!(!stages(&a[0].timings).iter().any(|s| s.starts_with("load")));
    assert!(seq.model().vision().is_none() && seq.model().llm().is_none());
}
